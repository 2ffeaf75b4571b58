"""Running the service with uvicorn: the connection deadlines, the graceful drain, TLS, and a server in a thread.

Deadlines (seconds, all configurable):

- header: a connection has this long to send a complete request head, from when it opens or its last
  answer was sent; then it is closed (idle or slow clients cannot hold connections open);
- idle: a kept-alive connection with no new request is closed after this long (uvicorn's keep-alive);
- body: a request has this long to send its body (enforced by the app, 408);
- drain: on SIGTERM or Ctrl-C the server stops accepting, finishes what is in flight, and after this long
  cancels what is left and exits.

`run` owns its process, so it also sets how many BLAS / OpenMP threads a check may use (one by default):
at C=1000, D=1,000 on 2 cores with the client beside it, one thread took single-row p99 from 6.2 to
3.5 ms and 4-in-flight throughput from 330 to 667 requests/s (`bench/serve.py`); OpenBLAS's idle threads
spin, and a server's parallelism is its concurrent requests.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..defenses.guard import Guard
from ..errors import LogitguardError
from . import DEFAULT_COMPUTE_THREADS, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, is_loopback
from .app import create_app

__all__ = ["run", "serve_in_thread"]


class _HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that does not complete a request head within
    `header_timeout` seconds of opening or of its last answer (uvicorn has no such deadline of its own)."""

    header_timeout = DEFAULT_HEADER_TIMEOUT
    _header_timer: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request head was parsed: a new request/response cycle began
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def _config(app: Any, *, log_level: str, header_timeout: float, idle_timeout: float, drain_timeout: float,
            **options: Any) -> uvicorn.Config:
    protocol = type("HeaderDeadline", (_HeaderDeadline,), {"header_timeout": float(header_timeout)})
    return uvicorn.Config(app, log_level=log_level, http=protocol, timeout_keep_alive=max(1, round(idle_timeout)),
                          timeout_graceful_shutdown=max(1, round(drain_timeout)), server_header=False,
                          date_header=False, **options)


def run(guard: Guard | str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        token: str | None = None, no_auth: bool = False, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
        compute_threads: int | None = DEFAULT_COMPUTE_THREADS, **app_options: Any) -> None:
    """Serve `guard` (a `Guard` or a guard file) until SIGTERM / Ctrl-C, then drain for `drain_timeout` s.

    Binding beyond loopback needs a `token` (bearer authentication) unless `no_auth` waives it explicitly.
    `ssl_certfile` and `ssl_keyfile` (PEM) serve HTTPS. `compute_threads` caps this process's BLAS and
    OpenMP threads (None: leave them). `app_options` go to `create_app`.
    """
    if token is None and not no_auth and not is_loopback(host):
        raise LogitguardError(f"binding to {host} exposes the guard to other machines: give a token (--token-file "
                              "or $LOGITGUARD_TOKEN), or waive authentication explicitly (--no-auth) when a proxy "
                              "in front authenticates")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise LogitguardError("TLS needs both a certificate and its key (--ssl-certfile and --ssl-keyfile)")
    if not isinstance(guard, Guard):
        guard = Guard.load(guard)
    app = create_app(guard, token=token, **app_options)
    if compute_threads is not None:
        from threadpoolctl import threadpool_limits  # scikit-learn's dependency: always present

        threadpool_limits(limits=compute_threads)  # for the life of the process
    uvicorn.Server(_config(app, log_level=log_level, header_timeout=header_timeout, idle_timeout=idle_timeout,
                           drain_timeout=drain_timeout, host=host, port=port, ssl_certfile=ssl_certfile,
                           ssl_keyfile=ssl_keyfile)).run()


@contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    header_timeout: float = DEFAULT_HEADER_TIMEOUT, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> Iterator[str]:
    """Run `app` with uvicorn (the same protocol and deadlines as `run`) in a background thread; yields its
    base URL (port 0: a free port). For tests, notebooks and benchmarks; the server stops when the block ends.
    """
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it every
    # keep-alive response waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(_config(app, log_level=log_level, header_timeout=header_timeout,
                                    idle_timeout=idle_timeout, drain_timeout=drain_timeout, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="logitguard-serve")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        bound = sock.getsockname()
        yield f"http://{f'[{bound[0]}]' if ':' in bound[0] else bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
