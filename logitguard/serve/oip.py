"""The Open Inference Protocol (KServe v2 REST, as Triton, KServe and Seldon MLServer speak it) beside /v1.

`register` adds the /v2 routes to the app; their decisions come from the same `_Service.check` as
``POST /v1/check`` (the same C, K, range and row checks, batching, metrics, drift and campaign watches,
`defenses.apply.decide`), with the v2 body format (`oip_codec`) plugged in as its parse and encode steps;
bodies are read by the app's reader, and the app's `Protection` middleware (token, in-flight limit) covers
/v2 as it covers /v1. The guard is served as one model (`model_name`, version "1"); errors are
``{"error": "one line"}``. The routes are left out of this app's OpenAPI document: the protocol has its
own published specification.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.exception_handlers import http_exception_handler
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..defenses.decision import Decision
from ..defenses.guard import Guard
from ..errors import LogitguardError
from .codec import JSON, RequestError, json_values_limit
from .oip_codec import HEADER_LENGTH, InferRequest, encode_infer, outputs_of, parse_infer, quoted
from .protection import error_key

VERSION = "1"  # the one model version served
MODEL = "/v2/models/{model_name}"
VERSIONED = MODEL + "/versions/{model_version}"
ENDPOINTS = ("/v2", "/v2/health/live", "/v2/health/ready", MODEL, f"{MODEL}/ready", f"{MODEL}/infer", VERSIONED,
             f"{VERSIONED}/ready", f"{VERSIONED}/infer")
BINARY = "application/octet-stream"
HEADER_VALUES = 256  # numbers and arrays a JSON header may hold beyond its tensors' (shapes, names, outputs)

__all__ = ["ENDPOINTS", "VERSION", "register"]


class CheckService(Protocol):
    """What `register` needs of the app's service (`logitguard.serve.app._Service`)."""

    guard: Guard
    max_rows: int
    max_body_bytes: int
    body_timeout: float
    authenticated: bool

    def check(self, body: bytes | bytearray, parse: Any, encode: Any, client: str | None = None) -> Any: ...


def register(app: FastAPI, service: CheckService, *, model_name: str,
             read_body: Callable[[Request, str | None, int, float], Awaitable[bytearray]],
             client_key: Callable[[Request], str | None]) -> None:
    """Add the v2 routes to `app`, serving ``service.guard`` as the model `model_name`.

    read_body : the app's body reader (content type, None here: any; size limit, 413; body timeout, 408).
    client_key : the key the campaign watch tracks a request's client by.

    Inputs: ``logits`` FP32 [N, C] and, where the guard reads noise queries, ``noisy_logits`` FP32
    [N, K, C] (FP16, FP64 and integer datatypes are accepted too). Outputs: ``label`` INT64 [N] (-1 where
    the row is rejected), ``flagged`` BOOL [N], ``score`` FP32 [N] (only with a detector), ``model_label``
    INT64 [N]. Statuses: 400 a malformed or wrong request (shape, C, K, NaN, datatype, binary sizes, rows),
    404 an unknown model or version, 415 a compressed body; and the app's 401, 408, 413, 429 and 503.
    """
    if not model_name or len(model_name) > 100 or not model_name.isprintable() or set(model_name) & set("/?#%"):
        raise LogitguardError(f"model_name must be 1-100 printable characters without / ? # %, got {model_name!r}")
    guard = service.guard
    c, k = guard.num_classes, guard.num_queries
    inputs = ("logits", "noisy_logits") if guard.needs_noise else ("logits",)
    outputs = outputs_of(guard.defense.detector is not None)
    dims = {"logits": [-1, c], "noisy_logits": [-1, k, c]}
    metadata = {"name": model_name, "versions": [VERSION], "platform": "logitguard",
                "inputs": [{"name": n, "datatype": "FP32", "shape": dims[n]} for n in inputs],
                "outputs": [{"name": o.name, "datatype": o.datatype, "shape": [-1]} for o in outputs]}
    hidden = {"include_in_schema": False}
    max_values = json_values_limit(c, k, service.max_rows) + HEADER_VALUES
    # Software versions only to callers who hold a token, as /openapi.json and /v1/info do.
    version = __version__ if service.authenticated else "withheld"

    def model(request: Request) -> None:
        """Refuse (404) a request for another model or version than the one served."""
        name, version = request.path_params["model_name"], request.path_params.get("model_version")
        if name != model_name:
            raise RequestError(404, f"unknown model {quoted(name)}; this server serves {model_name!r}")
        if version is not None and version != VERSION:
            raise RequestError(404, f"unknown version {quoted(version)} of model {model_name!r}; it has "
                                    f"{VERSION!r}")

    async def routing_error(request: Request, exc: HTTPException) -> Response:
        """The router's own 404 and 405 in the protocol's shape under /v2 (FastAPI's everywhere else)."""
        if error_key(request.url.path) == "detail":
            return await http_exception_handler(request, exc)
        routes = "/v2, /v2/health/{live,ready}, /v2/models/{name}[/versions/1][/ready], POST .../infer"
        return JSONResponse({"error": f"{str(exc.detail).lower()}; the protocol's routes are {routes}"},
                            exc.status_code, headers=exc.headers)

    app.add_exception_handler(HTTPException, routing_error)

    @app.get("/v2", **hidden)
    async def server_metadata() -> dict[str, Any]:
        return {"name": "logitguard", "version": version, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", **hidden)
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", **hidden)
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get(MODEL, **hidden)
    @app.get(VERSIONED, **hidden)
    async def model_metadata(request: Request) -> Response:
        try:
            model(request)
        except RequestError as exc:
            return error(exc)
        return JSONResponse(metadata)

    @app.get(f"{MODEL}/ready", **hidden)
    @app.get(f"{VERSIONED}/ready", **hidden)
    async def model_ready(request: Request) -> Response:
        try:
            model(request)
        except RequestError as exc:
            return error(exc)
        return JSONResponse({"name": model_name, "ready": True})

    @app.post(f"{MODEL}/infer", **hidden)
    @app.post(f"{VERSIONED}/infer", **hidden)
    async def infer(request: Request) -> Response:
        """Decide N rows: v2 inputs ``logits`` [N, C] (and ``noisy_logits`` [N, K, C]) → the guard's outputs,
        through `_Service.check` (the /v1 path) with the v2 codec as its parse and encode steps."""
        header_length = request.headers.get(HEADER_LENGTH)
        parsed: list[InferRequest] = []  # parse's result, for encode (both run in the threadpool, in turn)

        def parse(body: bytes | bytearray, *, needs_noise: bool, max_rows: int) -> tuple:
            parsed.append(parse_infer(body, header_length, inputs=inputs, outputs=outputs, max_rows=max_rows,
                                      max_values=max_values))
            return parsed[0].logits, parsed[0].noisy

        def encode(decision: Decision) -> tuple[bytes, int | None]:
            return encode_infer(decision, parsed[0], model_name, VERSION)

        try:
            model(request)
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise RequestError(415, f"compressed bodies ({quoted(encoding)}) are not accepted; send it "
                                        "uncompressed")
            body = await read_body(request, None, service.max_body_bytes, service.body_timeout)  # any content type
            content, head = await run_in_threadpool(service.check, body, parse, encode, client_key(request))
        except RequestError as exc:
            return error(exc)
        if head is None:
            return Response(content, media_type=JSON)
        return Response(content, media_type=BINARY, headers={HEADER_LENGTH: str(head)})


def error(exc: RequestError) -> JSONResponse:
    """The protocol's error reply, ``{"error": "one line"}``; a wrong body is 400 here (as Triton and KServe
    answer) where /v1 says 422."""
    return JSONResponse({"error": exc.detail}, 400 if exc.status == 422 else exc.status)

