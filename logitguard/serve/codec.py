"""Request bodies to arrays and `Decision`s to response bodies, for JSON and Arrow IPC streams.

Every function raises `RequestError` (an HTTP status and a one-line message) for anything a client
can get wrong; nothing here trusts the body. Shape, C, K and finiteness checks are the guard's own
(`logitguard.defenses.estimator.check_logits`), run by `Guard.check`.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..defenses.decision import ABSTAIN, Decision

JSON = "application/json"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
COLUMNS = ("logits", "noisy_logits")
# The largest magnitude accepted: float32's range. Any model's logits fit; far larger finite values
# overflow float64 arithmetic inside detectors (squares of 1e200 are inf) and yield NaN scores.
MAX_ABS = float(np.finfo(np.float32).max)
# Noise queries per row that a guard reading none (K = 0) tolerates, and ignores, in a JSON body.
IGNORED_QUERIES = 8
RESULT_SCHEMA = pa.schema([
    pa.field("model_label", pa.int64(), nullable=False),
    pa.field("flagged", pa.bool_(), nullable=False),
    pa.field("score", pa.float64()),  # null without a detector
    pa.field("label", pa.int64()),  # null where the row is rejected (abstained)
])


class RequestError(Exception):
    """A request the service refuses: `status` (4xx) and a message for the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


# -- JSON ---------------------------------------------------------------------------------------


class CheckRequest(BaseModel):
    """Rows to check: the model's logits and, when the guard reads them, its noise queries."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    logits: list[list[float]] = Field(description="(N, C): the model's logits, one row of C numbers per input.")
    noisy_logits: list[list[list[float]]] | None = Field(
        None, description="(N, K, C): the model's logits on K noise-perturbed copies of each input. Required when "
                          "the guard's num_queries K > 0; ignored when K = 0.")


class CheckResult(BaseModel):
    """The guard's decision on one row."""

    model_config = ConfigDict(populate_by_name=True)

    model_label: int = Field(description="The model's own argmax.")
    model_class: str = Field(description="Its class name.")
    flagged: bool = Field(description="The detector's verdict (every row when the guard has no detector).")
    score: float | None = Field(description="Detector score, higher = more likely adversarial; null without a detector.")
    label: int | None = Field(description="The label to act on; null where the row is rejected (abstained).")
    class_: str | None = Field(alias="class", description="Its class name; null where abstained.")
    abstained: bool = Field(description="True where the guard gives no label (on_flag 'reject' or 'agree').")


class CheckResponse(BaseModel):
    """Decisions in request order."""

    rows: int = Field(description="N, the rows checked.")
    results: list[CheckResult]


class ErrorResponse(BaseModel):
    """A refused request."""

    detail: str = Field(description="What was wrong, in one line.")


def request_schema(num_classes: int, num_queries: int, max_rows: int) -> dict[str, Any]:
    """`CheckRequest`'s JSON schema with this guard's C, K and row limit filled in (for OpenAPI)."""
    schema = CheckRequest.model_json_schema()
    props = schema["properties"]
    number = {"type": "number", "minimum": -MAX_ABS, "maximum": MAX_ABS}
    row = {"type": "array", "items": number, "minItems": num_classes, "maxItems": num_classes}
    props["logits"].update(type="array", items=row, minItems=1, maxItems=max_rows)
    noisy = props["noisy_logits"]
    if not num_queries:  # read by nothing: up to IGNORED_QUERIES per row of up to C numbers, or null
        ignored = {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "maxItems": num_classes},
                   "maxItems": IGNORED_QUERIES}
        noisy.update(anyOf=[{"type": "array", "items": ignored, "maxItems": max_rows}, {"type": "null"}],
                     description=f"Ignored: this guard reads no noise queries (K = 0); at most {IGNORED_QUERIES} "
                                 "per row of at most C numbers are tolerated.")
        return schema
    queries = {"type": "array", "items": row, "minItems": num_queries, "maxItems": num_queries}
    noisy.update(anyOf=[{"type": "array", "items": queries, "minItems": 1, "maxItems": max_rows}])
    schema["required"] = ["logits", "noisy_logits"]
    return schema


def parse_json(body: bytes | bytearray, *, needs_noise: bool, max_rows: int, max_values: int | None = None,
               num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A `CheckRequest` body as logits (N, C) and noise queries (N, K, C) or None (also when the guard reads none).

    `max_values` bounds the numbers the body may hold, checked on the raw bytes before anything is parsed
    (see `json_values_bound`): parsing costs memory in proportion to the limits, not to the body. Noise
    queries a guard does not read are ignored within `request_schema`'s bounds (`IGNORED_QUERIES` per row of
    at most `num_classes` numbers) and refused beyond them."""
    if max_values is not None and json_values_bound(body) > max_values:
        raise RequestError(422, f"the body holds more numbers than this server takes ({max_values}: its row limit "
                                f"of {max_rows} rows of logits and noise queries); split the batch")
    try:
        request = CheckRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    check_rows(len(request.logits), max_rows)
    logits = _dense(request.logits, "logits", 2)
    noisy = None
    if not needs_noise and request.noisy_logits is not None:
        _check_ignored(request.noisy_logits, max_rows, num_classes)
    if needs_noise and request.noisy_logits is not None:
        if len(request.noisy_logits) != len(logits):
            raise RequestError(422, f"noisy_logits has {len(request.noisy_logits)} rows; logits has {len(logits)}")
        noisy = _dense(request.noisy_logits, "noisy_logits", 3)
    return logits, noisy


def _check_ignored(noisy: list, max_rows: int, num_classes: int | None) -> None:
    """Refuse ignored noise queries beyond the schema's bounds (lengths only: no number is converted)."""
    rows = len(noisy)
    queries = max(map(len, noisy), default=0)
    widest = max((len(q) for row in noisy for q in row), default=0)
    if rows > max_rows or queries > IGNORED_QUERIES or (num_classes is not None and widest > num_classes):
        raise RequestError(422, f"noisy_logits, which this guard ignores (K = 0), may hold at most {max_rows} rows "
                                f"of {IGNORED_QUERIES} queries of C numbers; got up to {rows} x {queries} x {widest}")


def json_values_bound(body: bytes | bytearray) -> int:
    """An upper bound on the numbers (and arrays) a JSON body holds: its commas plus its opening brackets
    (an array of n items has n - 1 commas). Two passes of `bytes.count`, no copy and no parse."""
    return body.count(b",") + body.count(b"[")


def json_values_limit(num_classes: int, num_queries: int, max_rows: int) -> int:
    """The largest `json_values_bound` of a body of `max_rows` rows of C logits and K noise queries (a guard
    with K = 0 ignores noise queries: it tolerates `IGNORED_QUERIES` of them per row)."""
    k = num_queries or IGNORED_QUERIES
    return max_rows * (num_classes * (1 + k) + k + 2) + 4


def encode_json(decision: Decision, class_names: list[str]) -> bytes:
    """A `CheckResponse` body: one record per row, keys as in `CheckResult`."""
    names = np.array([*class_names, None], dtype=object)  # label -1 (abstained) picks None
    label = np.where(decision.label == ABSTAIN, None, decision.label.astype(object))
    score = np.where(np.isnan(decision.score), None, decision.score.astype(object))
    keys = ("model_label", "model_class", "flagged", "score", "label", "class", "abstained")
    columns = (decision.model_label.tolist(), names[decision.model_label].tolist(), decision.flagged.tolist(),
               score.tolist(), label.tolist(), names[decision.label].tolist(), (decision.label == ABSTAIN).tolist())
    results = [dict(zip(keys, row)) for row in zip(*columns)]
    return json.dumps({"rows": len(results), "results": results}, allow_nan=False, separators=(",", ":")).encode()


def _validation_error(exc: ValidationError) -> RequestError:
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return RequestError(400, f"malformed JSON: {short(errors[0]['msg'].removeprefix('Invalid JSON: '))}")
    first = errors[0]
    where = short("".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                          for i, p in enumerate(first["loc"])))
    message = first["msg"]
    if first["type"] == "finite_number":
        message += " (NaN and Infinity are refused)"
    elif first["type"] == "extra_forbidden":
        message = f"unknown field; the body takes {', '.join(COLUMNS)}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return RequestError(422, f"{where or 'body'}: {message}{more}")


def _dense(values: list, name: str, ndim: int) -> np.ndarray:
    """Nested lists as a float64 array; a ragged nesting is named by its first odd sub-list."""
    try:
        return np.array(values, dtype=np.float64)
    except ValueError:
        raise RequestError(422, _ragged(values, name, ndim)) from None


def _ragged(values: list, name: str, ndim: int) -> str:
    """Error path only: the first sub-list whose length differs from the first one at its depth."""
    level = [(name, values)]
    for _ in range(ndim - 1):
        children = [(f"{path}[{i}]", child) for path, v in level for i, child in enumerate(v)]
        first_path, first = children[0]
        for path, child in children:
            if len(child) != len(first):
                return f"{name} is ragged: {path} has {len(child)} values, {first_path} has {len(first)}"
        level = children
    return f"{name} must be an array of shape {('(N, C)', '(N, K, C)')[ndim - 2]}"


def short(text: str, limit: int = 80) -> str:
    """`text` (which may come from the client) on one line and at most about `limit` characters: an error
    message never echoes a large or multi-line piece of a request."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def check_rows(rows: int, max_rows: int) -> None:
    """Refuse an empty batch and one over `max_rows` (422: the body's size is fine, its content is not)."""
    if rows == 0:
        raise RequestError(422, "empty batch: logits has no rows; send at least one")
    if rows > max_rows:
        raise RequestError(422, f"{rows} rows is over this server's limit of {max_rows} rows per request; "
                                "split the batch")


# -- Arrow IPC streams ------------------------------------------------------------------------


def parse_arrow(body: bytes | bytearray, *, needs_noise: bool, max_rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """An Arrow IPC stream as logits (N, C) and noise queries (N, K, C) or None.

    Columns: ``logits``, a list or fixed_size_list of C numbers per row; ``noisy_logits`` (when the guard
    reads noise queries), either a list of K lists of C numbers or one flat list of K*C numbers per row
    (query-major: query k, class c at k*C + c). Any float or integer value type. Compressed buffers,
    dictionary batches, nulls and other columns are refused.
    """
    if bytes(body[:6]) == b"ARROW1":
        raise RequestError(400, "got an Arrow IPC file; send an IPC stream (pyarrow.ipc.new_stream)")
    try:
        return _arrays(body, needs_noise, max_rows)
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow reports hostile bytes in many ways (ArrowInvalid, OSError,
        # UnicodeDecodeError for names, KeyError for a type it has no Python class for, ...): all are the body's fault
        raise RequestError(400, f"malformed Arrow IPC stream: {type(exc).__name__}: {short(exc)}") from None


def _arrays(body: bytes | bytearray, needs_noise: bool, max_rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    schema, batches = _read_stream(body, max_rows)
    unknown = [c for c in schema.names if c not in COLUMNS]
    if unknown or "logits" not in schema.names:
        raise RequestError(422, f"the stream has columns {short(schema.names)}; it takes 'logits' and, when the guard "
                                "reads noise queries, 'noisy_logits'")
    used = ["logits", "noisy_logits"] if needs_noise and "noisy_logits" in schema.names else ["logits"]
    for name in used:  # before any array is built: pyarrow has no Python class for some types
        _check_type(schema.field(name).type, name)
    table = pa.Table.from_batches(batches, schema)
    check_rows(table.num_rows, max_rows)
    logits = _arrow_dense(table.column("logits"), "logits")
    noisy = None
    if len(used) == 2:
        noisy = _arrow_dense(table.column("noisy_logits"), "noisy_logits")
        if noisy.ndim == 2:  # flat K*C per row
            c = logits.shape[1]
            if c == 0 or noisy.shape[1] % c:
                raise RequestError(422, f"flat noisy_logits hold {noisy.shape[1]} values per row, not a multiple of "
                                        f"C = {c}")
            noisy = noisy.reshape(len(noisy), -1, c)
    return logits, noisy


def encode_arrow(decision: Decision) -> pa.Buffer:
    """An IPC stream of one record batch with columns model_label, flagged, score and label (`RESULT_SCHEMA`)."""
    batch = pa.record_batch([
        pa.array(decision.model_label, pa.int64()),
        pa.array(decision.flagged, pa.bool_()),
        pa.array(decision.score, pa.float64(), mask=np.isnan(decision.score)),
        pa.array(decision.label, pa.int64(), mask=decision.label == ABSTAIN),
    ], schema=RESULT_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, RESULT_SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def _read_stream(body: bytes | bytearray, max_rows: int) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """Schema and batches, each checked before it is decoded (row count, compression) and fully validated
    after (offsets inside their buffers), so a hostile stream can neither exhaust memory nor read out of bounds."""
    schema, batches, rows = None, [], 0
    for message in pa.ipc.MessageReader.open_stream(pa.py_buffer(body)):
        if message.type == "schema" and schema is None:
            schema = pa.ipc.read_schema(message)
            continue
        if message.type != "record batch" or schema is None:
            raise RequestError(422, f"unexpected Arrow IPC message {message.type!r}: send one schema and "
                                    "record batches, without dictionary-encoded columns")
        length, compressed = _peek_record_batch(message.metadata)
        if compressed:
            raise RequestError(415, "compressed Arrow IPC buffers are not accepted; write the stream uncompressed")
        rows += length
        check_rows(max(rows, 1), max_rows)
        batch = pa.ipc.read_record_batch(message, schema)
        batch.validate(full=True)
        batches.append(batch)
    if schema is None:
        raise RequestError(400, "malformed Arrow IPC stream: no schema message")
    return schema, batches


def _peek_record_batch(metadata: pa.Buffer) -> tuple[int, bool]:
    """(rows, compressed?) of a record-batch message, read from its flatbuffer header without decoding the
    body: Message.header (field 2) -> RecordBatch.length (field 0) and .compression (field 3)."""
    buf = metadata.to_pybytes()

    def table(pos: int):
        vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        size = struct.unpack_from("<H", buf, vtable)[0]
        return lambda i: 0 if 4 + 2 * i >= size else struct.unpack_from("<H", buf, vtable + 4 + 2 * i)[0]

    root = struct.unpack_from("<I", buf, 0)[0]
    field = table(root)
    if not field(2):
        raise ValueError("record batch message without a header")
    header = root + field(2)
    batch = header + struct.unpack_from("<I", buf, header)[0]
    field = table(batch)
    length = struct.unpack_from("<q", buf, batch + field(0))[0] if field(0) else 0
    if length < 0:
        raise ValueError(f"negative record batch length {length}")
    return length, bool(field(3))


_LAYOUTS = {"logits": ((1,), "a list of C numbers per row"),
            "noisy_logits": ((1, 2), "a list of K lists of C numbers, or a flat list of K*C numbers, per row")}


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _check_type(kind: pa.DataType, name: str) -> None:
    """Refuse (422) a column type other than lists nested as `_LAYOUTS` says, of floats or integers."""
    depths, layout = _LAYOUTS[name]
    leaf, depth = kind, 0
    while _is_list(leaf):
        leaf, depth = leaf.value_type, depth + 1
    if depth not in depths or not (pa.types.is_floating(leaf) or pa.types.is_integer(leaf)):
        raise RequestError(422, f"{name} must be {layout}; got type {kind}")


def _arrow_dense(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """A column of (nested) lists of numbers, type checked by `_check_type`, as an (N, ...) array."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    shape, depth = [len(array)], 0
    while _is_list(array.type):
        depth += 1
        if array.null_count:
            raise RequestError(422, f"{name} has null lists at depth {depth}")
        if pa.types.is_fixed_size_list(array.type):
            size = array.type.list_size
        else:
            lengths = pc.list_value_length(array).to_numpy()
            size = int(lengths[0]) if len(lengths) else 0
            odd = np.flatnonzero(lengths != size)
            if len(odd):
                i = int(odd[0])
                where = f"row {i}" if depth == 1 else f"row {i // shape[1]}, query {i % shape[1]},"
                raise RequestError(422, f"{name} is ragged: {where} has {lengths[i]} values, the first has {size}")
        shape.append(size)
        array = array.flatten()
    if array.null_count:
        raise RequestError(422, f"{name} has null values")
    return array.to_numpy().reshape(shape)
