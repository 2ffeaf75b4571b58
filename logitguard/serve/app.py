"""The FastAPI application: endpoints, limits, error handling, metrics; and ways to run it.

See the package docstring (`logitguard.serve`) for the endpoints, formats and status codes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .. import __version__
from ..defenses.apply import decide
from ..defenses.decision import ABSTAIN, Decision
from ..errors import LogitguardError
from ..defenses.guard import Guard
from ..evaluation.guard import describe_guard
from . import (DEFAULT_BATCH_DELAY, DEFAULT_BODY_TIMEOUT, DEFAULT_DRIFT_ALPHA, DEFAULT_DRIFT_MIN_ROWS, DEFAULT_DRIFT_WINDOW,
               DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_ROWS)
from .batching import MicroBatcher
from .codec import (ARROW_STREAM, JSON, MAX_ABS, CheckResponse, ErrorResponse, RequestError, encode_arrow, encode_json,
                    json_values_limit, parse_arrow, parse_json, request_schema, short)
from .campaign import CampaignWatch
from .drift import DriftWatch
from .oip import ENDPOINTS as OIP_ENDPOINTS, register as register_oip
from .protection import Protection, error_key

log = logging.getLogger("logitguard.serve")
PREFIX = "/v1"
ENDPOINTS = (f"{PREFIX}/check", f"{PREFIX}/check.arrow", f"{PREFIX}/health", f"{PREFIX}/info", "/metrics",
             "/openapi.json", "/docs", *OIP_ENDPOINTS)  # /v2's with {model_name}: labelled by the matched route
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Client hang-ups are counted under this status (nginx's "client closed request"): they are not server errors.
CLIENT_CLOSED = 499

__all__ = ["create_app"]


class _Service:
    """What the endpoints share: the guard, the limits, the metrics and the drift watch."""

    def __init__(self, guard: Guard, *, max_rows: int, max_body_bytes: int, max_concurrency: int, body_timeout: float,
                 authenticated: bool, drift: DriftWatch, max_batch_rows: int, batch_delay: float,
                 campaign: CampaignWatch | None, campaign_block: bool) -> None:
        self.guard, self.max_rows, self.max_body_bytes, self.drift = guard, max_rows, max_body_bytes, drift
        self.max_concurrency, self.body_timeout, self.authenticated = max_concurrency, body_timeout, authenticated
        self.campaign, self.campaign_block = campaign, campaign_block
        # The one apply path, as every engine; concurrent requests share one call when batching.
        self.decide: Callable[[np.ndarray, np.ndarray | None], Decision] = functools.partial(decide, guard)
        self.batcher = None
        if max_batch_rows:
            self.batcher = self.decide = MicroBatcher(self.decide, max_rows=max_batch_rows, max_delay=batch_delay)
        self.info = _served_info(describe_guard(guard), authenticated)
        self.parse_json = functools.partial(parse_json, num_classes=guard.num_classes, max_values=json_values_limit(
            guard.num_classes, guard.num_queries, max_rows))
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

    def check(self, body: bytes | bytearray, parse: Callable[..., tuple], encode: Callable[..., Any],
              client: str | None = None) -> Any:
        """Parse, check, count and encode one request of `client` (its address; runs in the threadpool)."""
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
            decision = self.decide(logits, noisy)
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
        if self.campaign is not None and client is not None:
            alarm = self.campaign.observe(client, logits, decision.flagged, decision.label == ABSTAIN)
            if self.campaign_block and alarm.any():
                raise RequestError(429, "this client's queries look like a query attack; answers are withheld")
        return encode(decision)

    def limits(self) -> dict[str, Any]:
        batching = None if self.batcher is None else {"max_rows": self.batcher.max_rows,
                                                      "max_delay": self.batcher.max_delay}
        limits = {"max_rows": self.max_rows, "max_body_bytes": self.max_body_bytes, "batching": batching,
                  "max_concurrency": self.max_concurrency, "body_timeout": self.body_timeout,
                  "authentication": "bearer" if self.authenticated else None,
                  "formats": {f"{PREFIX}/check": JSON, f"{PREFIX}/check.arrow": ARROW_STREAM}}
        return {"version": __version__, **limits} if self.authenticated else limits


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
        if service.campaign is not None:
            texts = {"alarms_total": "Alarms raised: clients whose stream turned into a query attack's.",
                     "rows_alarmed_total": "Rows answered while their client was in alarm.",
                     "clients_in_alarm": "Clients in alarm now.", "clients_tracked": "Clients the watch holds.",
                     "clients_evicted_total": "Clients dropped to stay within the watch's client limit."}
            for name, value in service.campaign.metrics().items():
                yield GaugeMetricFamily(f"logitguard_campaign_{name}", texts.get(name, name), value=float(value))


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
        except ClientDisconnect:  # the client hung up mid-request: its loss, not a server error
            log.info("client hung up during %s %s", scope.get("method"), endpoint)
            status = CLIENT_CLOSED
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope["path"])
            if not status:  # nothing sent yet: answer; else the connection just ends
                await JSONResponse({error_key(scope["path"]): "internal server error; the error was logged"}, 500)(
                    scope, receive, send)
            status = 500
        finally:
            route = getattr(scope.get("route"), "path", None)  # set by the router: /v2/models/{model_name}/...
            endpoint = route if route in ENDPOINTS else endpoint
            self.service.requests.labels(endpoint, str(status)).inc()
            self.service.latency.labels(endpoint).observe(time.perf_counter() - started)


def create_app(guard: Guard, *, max_rows: int = DEFAULT_MAX_ROWS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               token: str | None = None, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, allowed_hosts: Sequence[str] | None = None,
               docs: bool = False, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
               batch_delay: float = DEFAULT_BATCH_DELAY, campaign: CampaignWatch | None = None,
               campaign_block: bool = False, drift_window: int = DEFAULT_DRIFT_WINDOW, drift_alpha: float = DEFAULT_DRIFT_ALPHA,
               drift_min_rows: int = DEFAULT_DRIFT_MIN_ROWS, model_name: str = "logitguard") -> FastAPI:
    """A FastAPI app serving `guard` (see `logitguard.serve` for the endpoints).

    max_rows : rows per request (more: 422); a JSON body may also hold no more numbers than that many rows
    of logits and noise queries, checked before it is parsed.  max_body_bytes : request body size, enforced
    while reading (more: 413).  token : bearer token every route but the health probes requires (None: no
    authentication; 401 otherwise).  max_concurrency : requests in flight (more: 503 with Retry-After).
    body_timeout : seconds a request has to send its body (more: 408).  allowed_hosts : accepted Host names
    (None: any).  docs : serve the browsable API page at /docs (its scripts come from a CDN; off by default).
    max_batch_rows, batch_delay : dynamic batching (`MicroBatcher`): concurrent requests' rows are decided
    together, up to this many rows, after waiting `batch_delay` seconds for company (0 rows: no batching).
    campaign : a `CampaignWatch` on each client address's logit stream (alarms in /v1/info and /metrics);
    campaign_block : answer 429 instead of the decision once a client's stream is in alarm.
    drift_window, drift_alpha, drift_min_rows : the `DriftWatch` on the detector's FPR.
    model_name : the guard's name as an Open Inference Protocol model (``/v2/models/{model_name}``).
    The app's state holds the service (``app.state.service``: guard, drift watch, metrics registry).
    """
    if min(max_rows, max_body_bytes, max_concurrency) < 1 or not body_timeout > 0 or max_batch_rows < 0 \
            or not batch_delay >= 0:
        raise LogitguardError(f"max_rows, max_body_bytes and max_concurrency must be >= 1, body_timeout > 0, "
                              f"max_batch_rows and batch_delay >= 0; got {max_rows}, {max_body_bytes}, "
                              f"{max_concurrency}, {body_timeout}, {max_batch_rows} and {batch_delay}")
    drift = DriftWatch.for_detector(guard.defense.detector, window=drift_window, alpha=drift_alpha,
                                    min_rows=drift_min_rows)
    service = _Service(guard, max_rows=max_rows, max_body_bytes=max_body_bytes, max_concurrency=max_concurrency,
                       body_timeout=body_timeout, authenticated=token is not None, drift=drift,
                       max_batch_rows=max_batch_rows, batch_delay=batch_delay, campaign=campaign,
                       campaign_block=campaign_block)
    app = FastAPI(title="logitguard", version=__version__ if token is not None else "withheld",
                  description=f"Checks a remote model's logits before acting on them: {guard!r}.",
                  docs_url="/docs" if docs else None, redoc_url=None, redirect_slashes=False)
    app.state.service = service
    # Starlette runs the last added outermost: every request is counted, refused ones included.
    app.add_middleware(Protection, token=token, max_concurrency=max_concurrency, allowed_hosts=allowed_hosts)
    app.add_middleware(_Instrument, service=service)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status)

    errors = {code: {"model": ErrorResponse, "description": text} for code, text in {
        429: "This client's stream looks like a query attack (with campaign_block).",
        400: "Malformed body (not JSON / not an Arrow IPC stream), or a request both chunked and with a length.",
        401: "Missing or wrong bearer token (when the server has one).",
        408: "The body did not arrive within the server's body timeout.",
        413: "Body over the server's size limit.",
        415: "Wrong content type.",
        422: "Valid syntax, wrong content: shape, C, K, NaN/inf, ragged, empty, too many rows, missing noise queries.",
        500: "Unexpected server error (logged; no details returned).",
        503: "Too many requests in flight; retry after the Retry-After header's seconds."}.items()}
    c, k = guard.num_classes, guard.num_queries

    @app.post(f"{PREFIX}/check", response_model=CheckResponse, responses=errors, summary="Check rows (JSON)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  JSON: {"schema": request_schema(c, k, max_rows)}}}})
    async def check(request: Request) -> Response:
        """Decide N rows: ``{"logits": (N, C), "noisy_logits": (N, K, C)}`` → one result per row, in order."""
        body = await _read_body(request, JSON, max_body_bytes, body_timeout)
        return Response(await run_in_threadpool(service.check, body, service.parse_json,
                                                lambda decision: encode_json(decision, guard.class_names),
                                                client_key(request)), media_type=JSON)

    @app.post(f"{PREFIX}/check.arrow", responses={
        200: {"description": "An Arrow IPC stream: model_label int64, flagged bool, score float64 (null without a "
                             "detector), label int64 (null where abstained).",
              "content": {ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}}}, **errors},
        summary="Check rows (Arrow IPC stream)", response_class=Response,
        openapi_extra={"requestBody": {"required": True, "content": {
            ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}}}})
    async def check_arrow(request: Request) -> Response:
        """Decide the rows of an Arrow IPC stream (columns ``logits`` and, with K > 0, ``noisy_logits``)."""
        body = await _read_body(request, ARROW_STREAM, max_body_bytes, body_timeout)
        result = await run_in_threadpool(service.check, body, parse_arrow, encode_arrow, client_key(request))
        return Response(memoryview(result), media_type=ARROW_STREAM)

    @app.get(f"{PREFIX}/health", summary="Liveness (open without a token: it says nothing about the guard)")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get(f"{PREFIX}/info", summary="The guard's description, the server's limits and the drift status")
    def info() -> dict[str, Any]:
        """`Guard.info` (classes, C, K, policy, detector threshold and FPR, threat figures, provenance),
        plus ``server`` (limits, formats) and ``drift`` (`DriftWatch.status`)."""
        campaign = None if service.campaign is None else {**service.campaign.status(), "block": service.campaign_block}
        return {**service.info, "server": service.limits(), "drift": service.drift.status(), "campaign": campaign}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    def metrics() -> Response:
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    # /v2: the Open Inference Protocol, decided by service.check; bodies read and clients keyed as here
    register_oip(app, service, model_name=model_name, read_body=_read_body, client_key=client_key)
    return app


async def _read_body(request: Request, media_type: str | None, limit: int, timeout: float) -> bytearray:
    """The body, after checking the content type (415) and the size (413: a declared Content-Length over
    `limit`, or more bytes than `limit` actually sent, counted while reading); 408 when it takes longer than
    `timeout` seconds to arrive (`media_type` None: any content type). A client that hangs up raises starlette's `ClientDisconnect`."""
    given = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type is not None and given != media_type:
        raise RequestError(415, f"content type {short(given) or 'missing'!r}; this endpoint takes {media_type!r}")
    too_large = RequestError(413, f"request body over this server's limit of {limit} bytes; send fewer rows per "
                                  "request")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout:g} s") from None
    return body


def client_key(request: Request) -> str | None:
    """The key the campaign watch tracks a client by: its address (a shared token cannot tell clients apart)."""
    return request.client.host if request.client is not None else None


def _served_info(info: dict[str, Any], authenticated: bool) -> dict[str, Any]:
    """`describe_guard`'s info as the service shows it: no directory of this machine (files by name only,
    their hashes identify them), and, to callers who need no token, no software versions."""
    info = _finite(info)
    provenance = dict(info.get("provenance") or {})
    for key in ("table", "manifest"):
        if isinstance(provenance.get(key), str):
            provenance[key] = Path(provenance[key]).name
    for key in ("model", "settings"):
        if isinstance(provenance.get(key), dict):
            provenance[key] = {k: Path(v).name if k in ("spec", "manifest") and isinstance(v, str) else v
                               for k, v in provenance[key].items()}
    if not authenticated:
        for key in ("logitguard", "numpy", "scikit-learn", "python"):
            provenance.pop(key, None)
    return {**info, "provenance": provenance} if "provenance" in info else info


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
