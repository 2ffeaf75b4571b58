"""The FastAPI application: endpoints, limits, error handling, metrics; and ways to run it.

See the package docstring (`logitguard.serve`) for the endpoints, formats and status codes.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..defenses.apply import decide
from ..defenses.decision import ABSTAIN
from ..errors import LogitguardError
from ..defenses.guard import Guard
from ..evaluation.guard import describe_guard
from . import DEFAULT_DRIFT_ALPHA, DEFAULT_DRIFT_MIN_ROWS, DEFAULT_DRIFT_WINDOW, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_ROWS
from .codec import (ARROW_STREAM, JSON, MAX_ABS, CheckResponse, ErrorResponse, RequestError, encode_arrow, encode_json,
                    parse_arrow, parse_json, request_schema)
from .drift import DriftWatch

log = logging.getLogger("logitguard.serve")
PREFIX = "/v1"
ENDPOINTS = (f"{PREFIX}/check", f"{PREFIX}/check.arrow", f"{PREFIX}/health", f"{PREFIX}/info", "/metrics",
             "/openapi.json", "/docs")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

__all__ = ["create_app", "run", "serve_in_thread"]


class _Service:
    """What the endpoints share: the guard, the limits, the metrics and the drift watch."""

    def __init__(self, guard: Guard, *, max_rows: int, max_body_bytes: int, drift: DriftWatch) -> None:
        self.guard, self.max_rows, self.max_body_bytes, self.drift = guard, max_rows, max_body_bytes, drift
        self.info = _finite(describe_guard(guard))
        self.registry = CollectorRegistry()
        self.requests = Counter("logitguard_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("logitguard_request_duration_seconds", "Time from request to response, by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rows = Counter("logitguard_rows_checked", "Rows checked.", registry=self.registry)
        self.flagged = Counter("logitguard_rows_flagged", "Rows the detector flagged.", registry=self.registry)
        self.abstained = Counter("logitguard_rows_abstained", "Rows given no label (rejected).", registry=self.registry)
        self.registry.register(_GaugeCollector(self))
        self.totals = [0, 0]  # rows checked, rows flagged: for the lifetime flagged-rate gauge
        self._lock = threading.Lock()

    def check(self, body: bytes | bytearray, parse: Callable[..., tuple], encode: Callable[..., Any]) -> Any:
        """Parse, check, count and encode one request (runs in the threadpool)."""
        guard = self.guard
        logits, noisy = parse(body, needs_noise=guard.needs_noise, max_rows=self.max_rows)
        if logits.ndim == 2 and logits.shape[1] != guard.num_classes:  # the first thing wrong is said first
            raise RequestError(422, f"logits have {logits.shape[1]} classes; expected {guard.num_classes}")
        if guard.needs_noise and noisy is None:
            raise RequestError(422, f"noisy_logits is required: this guard reads K = {guard.num_queries} noise queries "
                                    f"per row, shape (N, {guard.num_queries}, {guard.num_classes})")
        for name, values in (("logits", logits), ("noisy_logits", noisy)):
            # max/min need no temporary array; NaN compares False and is refused by Guard.check
            if values is None or not values.size:
                continue
            if float(values.max()) > MAX_ABS or float(values.min()) < -MAX_ABS:  # float(): no cast overflow
                row = int(np.argwhere(np.abs(values) > MAX_ABS)[0][0])
                raise RequestError(422, f"{name} row {row} holds a value beyond ±{MAX_ABS:.4g} (float32's range); "
                                        "no model's logits are that large")
        try:
            decision = decide(guard, logits, noisy)  # the one apply path, as every engine
        except LogitguardError as exc:
            raise RequestError(422, str(exc)) from None
        if guard.defense.detector is not None and not np.isfinite(decision.score).all():
            # Never answer "not flagged" from a score the detector could not compute.
            row = int(np.flatnonzero(~np.isfinite(decision.score))[0])
            log.warning("non-finite detector score on row %d of a request; refused", row)
            raise RequestError(422, f"the detector's score for row {row} is not finite (its arithmetic overflowed); "
                                    "the row was not decided")
        flagged = int(decision.flagged.sum())
        with self._lock:
            self.totals[0] += len(logits)
            self.totals[1] += flagged
        self.rows.inc(len(logits))
        self.flagged.inc(flagged)
        self.abstained.inc(int((decision.label == ABSTAIN).sum()))
        self.drift.update(decision.flagged, decision.score)
        return encode(decision)

    def limits(self) -> dict[str, Any]:
        return {"version": __version__, "max_rows": self.max_rows, "max_body_bytes": self.max_body_bytes,
                "formats": {f"{PREFIX}/check": JSON, f"{PREFIX}/check.arrow": ARROW_STREAM}}


class _GaugeCollector(Collector):
    """Gauges computed when scraped: the lifetime flagged rate and the drift watch's state."""

    def __init__(self, service: _Service) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        service = self.service
        rows, flagged = service.totals
        yield GaugeMetricFamily("logitguard_flagged_rate", "Share of all checked rows that were flagged (NaN before "
                                "any row).", value=flagged / rows if rows else math.nan)
        status = service.drift.status()
        gauges = {
            "applicable": ("1 when the guard has a detector (drift is tested), else 0.", status["applicable"]),
            "alert": ("1 when the window's flagged rate departs from the calibrated FPR (binomial p < alpha).",
                      status["alert"]),
            "window_rows": ("Rows in the drift window.", status.get("rows")),
            "flagged_rate": ("Flagged rate over the drift window.", status.get("flagged_rate")),
            "expected_rate": ("The detector's calibrated FPR: the flagged rate clean traffic would give.",
                              status.get("expected_rate")),
            "binomial_pvalue": ("Two-sided exact binomial test of the window's flags against the calibrated FPR.",
                                status.get("binomial_pvalue")),
            "ks_statistic": ("KS statistic of the window's scores against the clean calibration scores.",
                             status.get("ks_statistic")),
            "ks_pvalue": ("KS p-value of the window's scores against the clean calibration scores.",
                          status.get("ks_pvalue")),
        }
        for name, (text, value) in gauges.items():
            yield GaugeMetricFamily(f"logitguard_drift_{name}", text,
                                    value=math.nan if value is None else float(value))


class _Instrument:
    """ASGI middleware: counts and times every request, and turns an unexpected exception into a logged,
    generic 500 (no traceback reaches the client; the worker goes on)."""

    def __init__(self, app: Any, service: _Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status, started = 0, time.perf_counter()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope["path"])
            if not status:  # nothing sent yet: answer; else the connection just ends
                await JSONResponse({"detail": "internal server error; the error was logged"}, 500)(
                    scope, receive, send)
            status = 500
        finally:
            self.service.requests.labels(endpoint, str(status)).inc()
            self.service.latency.labels(endpoint).observe(time.perf_counter() - started)


def create_app(guard: Guard, *, max_rows: int = DEFAULT_MAX_ROWS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               drift_window: int = DEFAULT_DRIFT_WINDOW, drift_alpha: float = DEFAULT_DRIFT_ALPHA,
               drift_min_rows: int = DEFAULT_DRIFT_MIN_ROWS) -> FastAPI:
    """A FastAPI app serving `guard` (see `logitguard.serve` for the endpoints).

    max_rows : rows per request (more: 422).  max_body_bytes : request body size, enforced while reading
    (more: 413).  drift_window, drift_alpha, drift_min_rows : the `DriftWatch` on the detector's FPR.
    The app's state holds the service (``app.state.service``: guard, drift watch, metrics registry).
    """
    if max_rows < 1 or max_body_bytes < 1:
        raise LogitguardError(f"max_rows and max_body_bytes must be >= 1, got {max_rows} and {max_body_bytes}")
    drift = DriftWatch.for_detector(guard.defense.detector, window=drift_window, alpha=drift_alpha,
                                    min_rows=drift_min_rows)
    service = _Service(guard, max_rows=max_rows, max_body_bytes=max_body_bytes, drift=drift)
    app = FastAPI(title="logitguard", version=__version__,
                  description=f"Checks a remote model's logits before acting on them: {guard!r}.")
    app.state.service = service
    app.add_middleware(_Instrument, service=service)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status)

    errors = {code: {"model": ErrorResponse, "description": text} for code, text in {
        400: "Malformed body (not JSON / not an Arrow IPC stream).",
        413: "Body over the server's size limit.",
        415: "Wrong content type.",
        422: "Valid syntax, wrong content: shape, C, K, NaN/inf, ragged, empty, too many rows, missing noise queries.",
        500: "Unexpected server error (logged; no details returned)."}.items()}
    c, k = guard.num_classes, guard.num_queries

    @app.post(f"{PREFIX}/check", response_model=CheckResponse, responses=errors, summary="Check rows (JSON)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  JSON: {"schema": request_schema(c, k, max_rows)}}}})
    async def check(request: Request) -> Response:
        """Decide N rows: ``{"logits": (N, C), "noisy_logits": (N, K, C)}`` → one result per row, in order."""
        body = await _read_body(request, JSON, max_body_bytes)
        return Response(await run_in_threadpool(service.check, body, parse_json,
                                                lambda decision: encode_json(decision, guard.class_names)),
                        media_type=JSON)

    @app.post(f"{PREFIX}/check.arrow", responses={
        200: {"description": "An Arrow IPC stream: model_label int64, flagged bool, score float64 (null without a "
                             "detector), label int64 (null where abstained).",
              "content": {ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}}}, **errors},
        summary="Check rows (Arrow IPC stream)", response_class=Response,
        openapi_extra={"requestBody": {"required": True, "content": {
            ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}}}})
    async def check_arrow(request: Request) -> Response:
        """Decide the rows of an Arrow IPC stream (columns ``logits`` and, with K > 0, ``noisy_logits``)."""
        body = await _read_body(request, ARROW_STREAM, max_body_bytes)
        result = await run_in_threadpool(service.check, body, parse_arrow, encode_arrow)
        return Response(memoryview(result), media_type=ARROW_STREAM)

    @app.get(f"{PREFIX}/health", summary="Liveness and the loaded guard")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "guard": repr(guard), "num_classes": c, "num_queries": k}

    @app.get(f"{PREFIX}/info", summary="The guard's description, the server's limits and the drift status")
    def info() -> dict[str, Any]:
        """`Guard.info` (classes, C, K, policy, detector threshold and FPR, threat figures, provenance),
        plus ``server`` (limits, formats) and ``drift`` (`DriftWatch.status`)."""
        return {**service.info, "server": service.limits(), "drift": service.drift.status()}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    def metrics() -> Response:
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _read_body(request: Request, media_type: str, limit: int) -> bytearray:
    """The body, after checking the content type (415) and the size (413: a declared Content-Length over
    `limit`, or more bytes than `limit` actually sent, counted while reading)."""
    given = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if given != media_type:
        raise RequestError(415, f"content type {given or 'missing'!r}; this endpoint takes {media_type!r}")
    too_large = RequestError(413, f"request body over this server's limit of {limit} bytes; send fewer rows per "
                                  "request")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return body


def _finite(value: Any) -> Any:
    """`value` with non-finite floats replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


# -- running ----------------------------------------------------------------------------------


def run(guard: Guard | str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        **limits: Any) -> None:
    """Serve `guard` (a `Guard` or a guard file) with uvicorn until interrupted; `limits` go to `create_app`."""
    import uvicorn

    if not isinstance(guard, Guard):
        guard = Guard.load(guard)
    uvicorn.run(create_app(guard, **limits), host=host, port=port, log_level=log_level)


@contextmanager
def serve_in_thread(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                    log_level: str = "warning") -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL (port 0: a free port).

    For tests, notebooks and benchmarks; the server stops when the block ends.
    """
    import uvicorn

    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it every
    # keep-alive response waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
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
