"""An HTTP service for a `Guard`: clients send a model's logits, get the guard's decision per row.

Start it with ``logitguard serve GUARD.npz`` (loopback, port 8000) or `run` / `create_app` (FastAPI,
served by uvicorn). Needs the ``serve`` extra: ``pip install 'logitguard[serve]'``.

Endpoints
---------
``POST /v1/check`` (``application/json``)
    Body ``{"logits": [[C numbers], ...N rows], "noisy_logits": [[[C numbers] x K] x N]}``;
    ``noisy_logits`` is required when the guard's K (``num_queries``) > 0 and ignored when K = 0.
    Answer ``{"rows": N, "results": [{"model_label", "model_class", "flagged", "score", "label",
    "class", "abstained"}, ...]}`` in request order; ``score`` is null without a detector, ``label``
    and ``class`` are null where the row is rejected (``abstained``).
``POST /v1/check.arrow`` (``application/vnd.apache.arrow.stream``)
    An Arrow IPC *stream* (uncompressed) of record batches with column ``logits`` (list, large_list or
    fixed_size_list of C floats or ints) and, when K > 0, ``noisy_logits``: a list of K lists of C
    numbers, or a flat list of K*C numbers per row (query-major: query k, class c at k*C + c). Answer
    an IPC stream with columns ``model_label`` int64, ``flagged`` bool, ``score`` float64 (null
    without a detector) and ``label`` int64 (null where abstained). For large batches.
``GET /v1/health``
    ``{"status": "ok"}``: a liveness probe, open without a token.
``GET /v1/info``
    `Guard.info` (classes, C, K, noise recipe, on_flag, detector threshold / FPR / achieved FPR,
    corrector, threat figures, unmeasured threat models, provenance) plus ``server`` (limits) and
    ``drift`` (`DriftWatch.status`).
``GET /metrics``
    Prometheus text: ``logitguard_requests_total{endpoint,status}``,
    ``logitguard_request_duration_seconds`` (histogram by endpoint), ``logitguard_rows_checked_total``,
    ``logitguard_rows_flagged_total``, ``logitguard_rows_abstained_total``, ``logitguard_flagged_rate``
    and the ``logitguard_drift_*`` gauges (applicable, alert, window_rows, flagged_rate,
    expected_rate, binomial_pvalue, ks_statistic, ks_pvalue).
``GET /openapi.json`` (and ``GET /docs``, its browsable form, only with ``docs=True``: it loads a CDN's scripts)
    The OpenAPI spec (with this guard's C, K and row limit).

Open Inference Protocol (KServe v2 REST: Triton, KServe, Seldon MLServer, ``tritonclient``; `oip`)
    The guard is one model, ``model_name`` of `create_app` (default ``"logitguard"``), version ``"1"``.
    ``GET /v2`` (``{"name", "version", "extensions": ["binary_tensor_data"]}``), ``GET /v2/health/live``,
    ``GET /v2/health/ready``, ``GET /v2/models/{name}`` (inputs ``logits`` FP32 [-1, C] and, when K > 0,
    ``noisy_logits`` FP32 [-1, K, C]; outputs ``label`` INT64 [-1] (-1 where rejected), ``flagged`` BOOL,
    ``score`` FP32 (only with a detector) and ``model_label`` INT64), ``GET /v2/models/{name}/ready``, and
    ``POST /v2/models/{name}/infer``: JSON tensors (``data`` flat or nested; FP16/FP64/integer datatypes
    accepted too) or the binary tensor extension (``Inference-Header-Content-Length``,
    ``binary_data_size``; outputs binary per ``binary_data_output`` / per-output ``binary_data``); the
    ``outputs`` list and ``id`` are honoured. Also under ``/v2/models/{name}/versions/1/``. Decided by the
    same path as ``/v1/check``, behind the same protection; left out of the OpenAPI spec (the protocol
    publishes its own).

Protection (`protection`, `running`)
------------------------------------
A bearer token (``token``; ``--token-file`` or ``$LOGITGUARD_TOKEN``) guards every route but the health
probe; binding beyond loopback requires one unless waived (``no_auth``). At most ``max_concurrency``
requests are in flight (more: 503 with ``Retry-After``). Deadlines: a request head within
``header_timeout``, its body within ``body_timeout`` (408), ``idle_timeout`` between kept-alive requests,
``drain_timeout`` to finish in-flight work after SIGTERM. Callers without a token see no directory and no
software version. Memory is bounded by the limits: at most ``max_concurrency`` bodies of at most
``max_body_bytes``, and a JSON body is parsed only if it holds no more numbers than ``max_rows`` rows do.

Status codes
------------
200 decided; 400 malformed body (not JSON, not an Arrow IPC stream), both Content-Length and
Transfer-Encoding, or a Host not allowed; 401 missing or wrong token; 408 body too slow; 413 body over
``max_body_bytes`` (counted while reading, not taken from Content-Length alone); 415 wrong content type, or
compressed Arrow buffers; 422 well-formed but wrong: more than ``max_rows`` rows (or, in JSON, more numbers
than they hold), empty batch, C or K differ from the guard's, NaN / Infinity (JSON's ``NaN`` token or an
overflowing number included), values beyond float32's range (±3.4e38), ragged rows, missing noise queries,
unknown fields or columns, nulls; 500 an unexpected error, logged, with a generic message; 503 too many
requests in flight. Errors are ``{"detail": "one line"}`` and never echo more than a short excerpt of the
request. A client that hangs up is counted under status 499. Checking runs in a threadpool, so a large
batch does not block the event loop. Under ``/v2`` errors are ``{"error": "one line"}`` and a
wrong request is 400 where /v1 says 422 (as Triton and KServe answer), an unknown model or version 404, a
compressed body 415; the other statuses are as above.

Drift
-----
The service keeps the flags and scores of the last ``drift_window`` rows (`DriftWatch`) and tests the
window's flagged rate against the detector's calibrated FPR (exact binomial test) and its scores
against the clean calibration scores (KS test). ``alert`` is true when the binomial p-value is below
``drift_alpha`` with at least ``drift_min_rows`` rows: the flagged rate departs from what clean traffic
would give by more than chance explains (an attack campaign, or a change of the model or its inputs).
Without a detector drift is "not applicable".
"""

from __future__ import annotations

from typing import Any

# Defaults of `create_app`, `DriftWatch` and ``logitguard serve`` (kept here: importing this package is cheap).
DEFAULT_MAX_ROWS = 16384
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_DRIFT_WINDOW = 1000
DEFAULT_DRIFT_ALPHA = 1e-3
DEFAULT_DRIFT_MIN_ROWS = 100
DEFAULT_MAX_CONCURRENCY = 16
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 5.0
DEFAULT_DRAIN_TIMEOUT = 10.0
# Dynamic batching is off by default: with one BLAS thread per check, per-request HTTP and JSON work, not
# the guard's arithmetic, bounds a CPU server, and batching lowered requests/s (bench/serve.py).
DEFAULT_MAX_BATCH_ROWS = 0
TOKEN_ENV = "LOGITGUARD_TOKEN"  # where `read_token` looks for the bearer token without a token file
DEFAULT_BATCH_DELAY = 0.0
# BLAS / OpenMP threads per check: concurrency comes from concurrent requests, and BLAS threads that spin
# between calls take the cores those requests (and a client on the same machine) need.
DEFAULT_COMPUTE_THREADS = 1

__all__ = ["DEFAULT_BATCH_DELAY", "DEFAULT_BODY_TIMEOUT", "DEFAULT_COMPUTE_THREADS", "DEFAULT_DRAIN_TIMEOUT", "DEFAULT_DRIFT_ALPHA", "DEFAULT_DRIFT_MIN_ROWS", "DEFAULT_DRIFT_WINDOW",
           "DEFAULT_HEADER_TIMEOUT", "DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_BATCH_ROWS", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_CONCURRENCY",
           "DEFAULT_MAX_ROWS", "TOKEN_ENV", "DriftWatch", "create_app",
           "is_loopback", "read_token", "run", "serve_in_thread"]


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def __getattr__(name: str) -> Any:
    # The app needs the 'serve' extra (FastAPI, uvicorn, prometheus-client); the drift watch does not.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("run", "serve_in_thread"):
        from . import running

        return getattr(running, name)
    if name == "read_token":
        from .protection import read_token

        return read_token
    if name == "DriftWatch":
        from .drift import DriftWatch

        return DriftWatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
