"""Open Inference Protocol (KServe v2) inference bodies to arrays, and `Decision`s back to v2 replies.

A request body is a JSON header ``{"id"?, "parameters"?, "inputs": [...], "outputs"?: [...]}``, optionally
followed by raw tensor bytes (the binary tensor extension): the header's length is then in the
``Inference-Header-Content-Length`` HTTP header, and each binary input says its byte count in
``parameters.binary_data_size``; the bytes follow the header in input order, little-endian, row-major.
A JSON input carries ``data``, a flat row-major list or a nested one. A reply's outputs are JSON, or
binary where ``parameters.binary_data_output`` (the request's) or ``binary_data`` (the output's) says so.

Every function raises `RequestError` (400 for anything a client can get wrong) before any array is built
from a declared shape: a shape's element count must equal the data sent, which the body bounds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..defenses.decision import Decision
from .codec import RequestError, check_rows, json_values_bound, short

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_ID = 256  # characters of a request id (echoed in the reply)
RANKS = {"logits": 2, "noisy_logits": 3}  # (N, C) and (N, K, C)
# Input datatypes accepted for logits (converted to float64 by the guard), as little-endian NumPy dtypes.
INPUT_DTYPES = {name: np.dtype(code) for name, code in {
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}.items()}
_TENSOR_KEYS = {"name", "datatype", "shape", "parameters", "data"}
_REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}


@dataclass(frozen=True)
class Output:
    """One output tensor of the model: its v2 name and datatype, and the `Decision` field it holds."""

    name: str
    datatype: str
    dtype: str
    field: str


# label -1 = rejected (abstained); score: only where the guard has a detector (`outputs_of`).
OUTPUTS = (Output("label", "INT64", "<i8", "label"), Output("flagged", "BOOL", "?", "flagged"),
           Output("score", "FP32", "<f4", "score"), Output("model_label", "INT64", "<i8", "model_label"))


def outputs_of(has_detector: bool) -> tuple[Output, ...]:
    """The outputs a guard offers: ``score`` only with a detector (JSON has no NaN to stand for "none")."""
    return OUTPUTS if has_detector else tuple(o for o in OUTPUTS if o.name != "score")


@dataclass
class InferRequest:
    """A parsed request: logits (N, C), noise queries (N, K, C) or None, the id to echo, and the outputs to
    answer with, each with whether it goes back as binary data."""

    logits: np.ndarray
    noisy: np.ndarray | None
    id: str | None
    outputs: list[tuple[Output, bool]]


def quoted(value: Any) -> str:
    """`value`'s repr (a string's quoted and escaped) on one line, cut as `codec.short` cuts: client text is
    never echoed at length."""
    return short(repr(value))


def bad(message: str) -> RequestError:
    return RequestError(400, message)


def parse_infer(body: bytes | bytearray, header_length: str | None, *, inputs: tuple[str, ...],
                outputs: tuple[Output, ...], max_rows: int, max_values: int) -> InferRequest:
    """A v2 inference body (JSON header, then binary tensors when `header_length` is given) as an
    `InferRequest`. `inputs`: the input names the model takes; `outputs`: those it offers; `max_values`:
    the numbers and arrays the JSON header may hold (`codec.json_values_bound`), checked before parsing."""
    size = len(body)
    if header_length is None:
        start = size
    elif header_length.isascii() and header_length.isdigit() and len(header_length) < 20 and int(header_length) <= size:
        start = int(header_length)
    else:
        raise bad(f"{HEADER_LENGTH} is {quoted(header_length)}; it must be the JSON header's length in bytes, "
                  f"at most the body's {size}")
    head = bytes(body[:start])
    if json_values_bound(head) > max_values:
        raise bad(f"the JSON header holds more numbers than this server takes ({max_values}: its row limit of "
                  f"{max_rows} rows of logits and noise queries); split the batch, or send binary tensors")
    try:
        header = json.loads(head, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, ints past the digit limit
        raise bad(f"malformed JSON header: {str(exc)[:120]}") from None
    if not isinstance(header, dict):
        raise bad("the body must be a JSON object with 'inputs'")
    if unknown := set(header) - _REQUEST_KEYS:
        raise bad(f"unknown request field {quoted(sorted(unknown)[0])}; a request takes id, parameters, inputs, "
                  "outputs")
    request_id = header.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID):
        raise bad(f"id must be a string of at most {MAX_ID} characters")
    parameters = _mapping(header.get("parameters"), "parameters")
    tensors, end = _inputs(header.get("inputs"), body, start, header_length is not None, inputs, max_rows)
    if end != size:
        raise bad(f"{size - end} bytes after the JSON header belong to no input's binary_data_size")
    if "logits" not in tensors:
        raise bad("input 'logits' (N, C) is required")
    logits, noisy = tensors["logits"], tensors.get("noisy_logits")
    if noisy is not None and len(noisy) != len(logits):
        raise bad(f"noisy_logits has {len(noisy)} rows; logits has {len(logits)}")
    return InferRequest(logits, noisy, request_id, _outputs(header.get("outputs"), parameters, outputs))


def encode_infer(decision: Decision, request: InferRequest, model_name: str, version: str) -> tuple[bytes, int | None]:
    """The reply body ``{"model_name", "model_version", "id"?, "outputs": [{"name", "datatype", "shape", "data"
    or "parameters": {"binary_data_size"}}]}`` (then the binary outputs' bytes), and the JSON header's length
    when binary outputs follow it (for ``Inference-Header-Content-Length``), else None."""
    rows = len(decision.label)
    entries, blobs = [], []
    for output, binary in request.outputs:
        values = np.ascontiguousarray(getattr(decision, output.field), dtype=output.dtype)
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": [rows]}
        if binary:
            blobs.append(values.tobytes())
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = values.tolist()
        entries.append(entry)
    reply = {"model_name": model_name, "model_version": version,
             **({} if request.id is None else {"id": request.id}), "outputs": entries}
    head = json.dumps(reply, allow_nan=False, separators=(",", ":")).encode()
    return (b"".join([head, *blobs]), len(head)) if blobs else (head, None)


def _no_constant(token: str) -> float:
    raise ValueError(f"{token} is not a number JSON allows (NaN and Infinity are refused)")


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{what} must be a JSON object")
    return value


def _inputs(specs: Any, body: bytes | bytearray, offset: int, binary_allowed: bool, names: tuple[str, ...],
            max_rows: int) -> tuple[dict[str, np.ndarray], int]:
    """The named arrays of the ``inputs`` list, and where the binary data they claimed ends in `body`."""
    if not isinstance(specs, list) or not specs:
        raise bad("inputs must be a non-empty list of tensors {name, datatype, shape, data}")
    tensors: dict[str, np.ndarray] = {}
    for spec in specs:  # at most one per input name: not a loop over rows
        if not isinstance(spec, dict):
            raise bad("each input must be a JSON object {name, datatype, shape, data}")
        name = spec.get("name")
        if name not in names:
            raise bad(f"unknown input {quoted(name)}; this model takes {', '.join(map(repr, names))}")
        if name in tensors:
            raise bad(f"input {name!r} is given twice")
        if unknown := set(spec) - _TENSOR_KEYS:
            raise bad(f"input {name!r} has unknown field {quoted(sorted(unknown)[0])}")
        datatype = spec.get("datatype")
        if datatype not in INPUT_DTYPES:
            raise bad(f"input {name!r} has datatype {quoted(datatype)}; it takes FP32 (or FP16, FP64, INT8-64, "
                      "UINT8-64)")
        shape = _shape(spec.get("shape"), name)
        check_rows(shape[0], max_rows)
        count, dtype = math.prod(shape), INPUT_DTYPES[datatype]
        size = _mapping(spec.get("parameters"), f"input {name!r}'s parameters").get("binary_data_size")
        if size is None:
            values = _json_tensor(spec.get("data"), name, dtype, count)
        else:
            if "data" in spec:
                raise bad(f"input {name!r} has both data and binary_data_size")
            if not binary_allowed:
                raise bad(f"input {name!r} has binary_data_size but the request has no {HEADER_LENGTH} header")
            if type(size) is not int or size != count * dtype.itemsize:
                raise bad(f"input {name!r} has binary_data_size {quoted(size)}; shape {shape} of {datatype} "
                          f"takes {count * dtype.itemsize} bytes")
            if offset + size > len(body):
                raise bad(f"input {name!r}'s {size} bytes of binary data run past the end of the body")
            values = np.frombuffer(body, dtype, count, offset)
            offset += size
        tensors[name] = values.reshape(shape)
    return tensors, offset


def _shape(shape: Any, name: str) -> list[int]:
    rank = RANKS[name]
    if (not isinstance(shape, list) or len(shape) != rank
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"input {name!r} has shape {quoted(shape)}; it takes {rank} non-negative dimensions "
                  f"{('[N, C]', '[N, K, C]')[rank - 2]}")
    return shape


def _json_tensor(data: Any, name: str, dtype: np.dtype, count: int) -> np.ndarray:
    """``data`` (a flat or nested list of numbers) as a flat array of `count` values: float64, or int64 for an
    integer datatype (the guard converts either)."""
    if not isinstance(data, list):
        raise bad(f"input {name!r} needs data (a list of numbers) or parameters.binary_data_size")
    try:
        values = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise bad(f"input {name!r}'s data is ragged or not all numbers") from None
    kinds = "iu" if dtype.kind in "iu" else "iuf"
    if values.dtype.kind not in kinds:
        what = "integers" if kinds == "iu" else "numbers"
        raise bad(f"input {name!r}'s data must be {what}, got {values.dtype.kind!r}-kind values")
    if values.size != count:
        raise bad(f"input {name!r} has {values.size} values; its shape takes {count}")
    return values.reshape(-1)


def _outputs(specs: Any, parameters: dict, offered: tuple[Output, ...]) -> list[tuple[Output, bool]]:
    """The outputs asked for (all when none are named), each with whether it goes back as binary data."""
    default = parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise bad("parameters.binary_data_output must be true or false")
    if not specs:
        if specs not in (None, []):
            raise bad("outputs must be a list of {name, parameters}")
        return [(output, default) for output in offered]
    if not isinstance(specs, list):
        raise bad("outputs must be a list of {name, parameters}")
    by_name, chosen = {o.name: o for o in offered}, {}
    for spec in specs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in by_name:
            raise bad(f"unknown output {quoted(name)}; this model answers {', '.join(map(repr, by_name))}")
        if name in chosen:
            raise bad(f"output {name!r} is asked for twice")
        options = _mapping(spec.get("parameters"), f"output {name!r}'s parameters")
        if options.get("classification"):
            raise bad("the classification extension is not supported; ask for 'label' and 'model_label'")
        binary = options.get("binary_data", default)
        if not isinstance(binary, bool):
            raise bad(f"output {name!r}'s binary_data must be true or false")
        chosen[name] = (by_name[name], binary)
    return list(chosen.values())
