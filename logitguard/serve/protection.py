"""What stands between the network and the guard: one ASGI middleware for authentication, the in-flight
limit and request framing, and the token's sources.

`Protection` answers before any endpoint runs, in this order:

1. 400 for a request that carries both ``Content-Length`` and ``Transfer-Encoding`` (a proxy that trusts
   one and a server that trusts the other disagree on where the request ends: request smuggling), and for
   a ``Host`` outside `allowed_hosts` (DNS rebinding of a loopback service);
2. 401 without a valid bearer token (``Authorization: Bearer <token>``, compared in constant time), with
   no detail on what was wrong; the liveness/readiness routes stay open for orchestrators' probes;
3. 503 with ``Retry-After`` when `max_concurrency` requests are already in flight: refused at once
   rather than queued, so overload costs the refused clients a round trip, not the server memory.

Errors take the route's shape: ``{"detail": ...}`` on ``/v1`` and the rest, ``{"error": ...}`` on the Open
Inference Protocol's ``/v2``.
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import LogitguardError
from . import TOKEN_ENV
# Probes of liveness and readiness: open without a token, and they say nothing about the guard.
OPEN_PATHS = frozenset({"/v1/health", "/v2/health/live", "/v2/health/ready"})
RETRY_AFTER_SECONDS = 1

__all__ = ["OPEN_PATHS", "TOKEN_ENV", "Protection", "read_token"]


def read_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The bearer token: the first line of `token_file` if given, else the ``LOGITGUARD_TOKEN`` environment
    variable, else None. Refuses an empty token, one shorter than 16 characters, and a token file that other
    users can read (`LogitguardError`)."""
    if token_file is not None:
        path = Path(token_file)
        try:
            mode = path.stat().st_mode
            token = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
        except (OSError, UnicodeDecodeError) as exc:
            raise LogitguardError(f"cannot read the token file {path}: {exc.__class__.__name__}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise LogitguardError(f"the token file {path} is readable by other users; chmod 600 it")
        source = f"the token file {path}"
    else:
        token = os.environ.get(TOKEN_ENV)
        if token is None:
            return None
        token, source = token.strip(), f"${TOKEN_ENV}"
    if len(token) < 16:
        raise LogitguardError(f"{source} holds a token of {len(token)} characters; use at least 16 random ones "
                              "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


class Protection:
    """ASGI middleware: framing and host checks, bearer authentication, and the in-flight limit (see module).

    token : the bearer token, or None for no authentication.  max_concurrency : requests in flight at most
    (the open probe routes are not counted).  allowed_hosts : accepted ``Host`` names (port ignored), or
    None for any.
    """

    def __init__(self, app: Any, *, token: str | None, max_concurrency: int,
                 allowed_hosts: Sequence[str] | None) -> None:
        self.app, self.max_concurrency = app, max_concurrency
        self.token = None if token is None else f"Bearer {token}".encode()
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.in_flight = 0  # touched only on the event loop's thread

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, list[bytes]] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, []).append(value)
        path = scope["path"]
        if b"transfer-encoding" in headers and b"content-length" in headers:
            await _refuse(send, path, 400, "a request may not carry both Content-Length and Transfer-Encoding",
                          close=True)
            return
        if self.allowed_hosts is not None and _host(headers) not in self.allowed_hosts:
            await _refuse(send, path, 400, "unexpected Host header")
            return
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.token is not None and not hmac.compare_digest(headers.get(b"authorization", [b""])[0], self.token):
            await _refuse(send, path, 401, "unauthorized", extra=[(b"www-authenticate", b"Bearer")])
            return
        if self.in_flight >= self.max_concurrency:
            await _refuse(send, path, 503, "server busy; retry shortly",
                          extra=[(b"retry-after", str(RETRY_AFTER_SECONDS).encode())])
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def _host(headers: dict[bytes, list[bytes]]) -> str:
    """The Host header's name without its port ('' when missing or repeated)."""
    values = headers.get(b"host", [])
    if len(values) != 1:
        return ""
    host = values[0].decode("latin-1").lower()
    if host.startswith("["):  # [::1]:8000
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def error_key(path: str) -> str:
    """The key of an error reply on `path`: "error" under the Open Inference Protocol's /v2, else "detail"."""
    return "error" if path == "/v2" or path.startswith("/v2/") else "detail"


async def _refuse(send: Callable, path: str, status: int, message: str, *, close: bool = False,
                  extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer `status` with the route's error shape, and nothing from the request in it."""
    body = b'{"%s":"%s"}' % (error_key(path).encode(), message.encode())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
