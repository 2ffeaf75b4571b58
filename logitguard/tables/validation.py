"""Validation: `conform` turns an Arrow table into a `LogitTable` or refuses it with a `TableError` that
names the column and the row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import TableError
from .arrays import single_array
from .schema import METADATA_KEY, NULLABLE_COLUMNS, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, SCHEMA_VERSION, TENSOR_DIMS, VECTOR_COLUMNS, check_columns, parse_metadata
from .table import LogitTable


def conform(table: pa.Table, *, metadata: Mapping[str, Any] | None = None,
            shapes: Mapping[str, tuple[int, ...]] | None = None) -> LogitTable:
    """Validate `table` against the contract and cast it to the canonical column types.

    Accepts any integer width for integer columns, string/large_string/dictionary for names, and
    list/large_list/fixed_size_list of any float for tensor columns. Metadata defaults to the table's
    own schema metadata. `shapes` (`row_shapes` of an earlier batch of the same table) fixes the per-row
    shape of tensor columns, e.g. ``{"logits": (C,), "noisy_logits": (K, C)}``: every batch of a streamed
    table must agree with its first, as every row of a table read whole must. Raises `TableError` naming
    the column, the row and what was expected.
    """
    shapes = dict(shapes or {})
    if metadata is None:
        metadata = parse_metadata((table.schema.metadata or {}).get(METADATA_KEY), "table")
    metadata = dict(metadata)
    check_columns(table.column_names)
    if table.num_rows == 0:
        raise TableError("the table has no rows")
    version = metadata.setdefault("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise TableError(
            f"table schema version {version!r} is not supported (this logitguard reads version "
            f"{SCHEMA_VERSION} and older); upgrade logitguard"
        )
    out: dict[str, pa.Array] = {}
    for name in ("sample_id", "split", "attack"):
        out[name] = _scalar(table, name, out)
    num_classes = metadata.get("num_classes", shapes.get("logits", (None,))[0])
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise TableError(f"metadata 'num_classes' must be an integer >= 2, got {num_classes!r}")
    out["logits"], (num_classes,) = _tensor(_array(table, "logits"), "logits", (num_classes,), out)
    if num_classes < 2:
        raise TableError(f"column 'logits' has {num_classes} values per row; a classifier needs at least 2")
    out["label"] = _scalar(table, "label", out)
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names:
            continue
        if name == "noisy_logits":
            queries = shapes.get(name, (None,))[0]
            out[name], _ = _tensor(_array(table, name), name, (queries, num_classes), out)
        elif name in VECTOR_COLUMNS:
            out[name], _ = _tensor(_array(table, name), name, shapes.get(name, (None,))[:1], out)
        else:
            out[name] = _scalar(table, name, out)
    for name in ("label", "pred", "external_label"):
        if name in out:
            _check_class_range(out, name, num_classes)
    _check_unique_keys(out)
    metadata["num_classes"] = num_classes
    metadata["class_names"] = _class_names(metadata.get("class_names"), num_classes)
    order = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in out]
    return LogitTable(pa.table({c: out[c] for c in order}), metadata)


def row_shapes(table: LogitTable) -> dict[str, tuple[int, ...]]:
    """The per-row shape of each tensor column of a conformed table: ``logits`` (C,), ``noisy_logits`` (K, C),
    ``features`` (F,), ``insen`` (S,); what `conform(…, shapes=…)` holds later batches of the table to."""
    return {name: tuple(_fixed_shape(table.arrow.schema.field(name).type))
            for name in TENSOR_DIMS if name in table.columns}


def _fixed_shape(kind: pa.DataType) -> list[int]:
    shape = []
    while pa.types.is_fixed_size_list(kind):
        shape.append(kind.list_size)
        kind = kind.value_type
    return shape


def check_schema(schema: pa.Schema) -> None:
    """Refuse a table whose Arrow `schema` (from the file footers, before any row is read) gives a column a
    type the contract does not allow, with `conform`'s message: e.g. float labels are refused by name before
    a reader casts them. Fixed-size tensor columns must also agree on C (``logits`` and ``noisy_logits``)."""
    check_columns(schema.names)
    for field in schema:
        if field.name in _SCALAR_KINDS:
            kind = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
            expected, accepts, _ = _SCALAR_KINDS[field.name]
            if not accepts(kind) and not (pa.types.is_null(kind) and field.name in NULLABLE_COLUMNS):
                raise TableError(f"column {field.name!r} has type {kind}, expected {expected}")
        elif field.name in TENSOR_DIMS:
            kind = field.type
            listlike = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
            if not any(is_type(kind) for is_type in listlike):
                raise TableError(f"column {field.name!r} has type {kind}, expected a list of float32 with shape "
                                 f"({TENSOR_DIMS[field.name]})")
    if "logits" in schema.names and "noisy_logits" in schema.names:
        logits = _fixed_shape(schema.field("logits").type)
        noisy = _fixed_shape(schema.field("noisy_logits").type)
        if logits and len(noisy) == 2 and noisy[1] != logits[0]:
            raise TableError(f"column 'noisy_logits' has {noisy[1]} values per entry, expected {logits[0]} "
                             "(num_classes)")


_SCALAR_KINDS = {
    "sample_id": ("int64", pa.types.is_integer, pa.int64()),
    "label": ("int64", pa.types.is_integer, pa.int64()),
    "pred": ("int64", pa.types.is_integer, pa.int64()),
    "split": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), pa.string()),
    "attack": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), pa.string()),
    "success": ("bool", pa.types.is_boolean, pa.bool_()),
    "flagged": ("bool", pa.types.is_boolean, pa.bool_()),
    "linf": ("float32", pa.types.is_floating, pa.float32()),
    "l2": ("float32", pa.types.is_floating, pa.float32()),
    "external_score": ("float32", pa.types.is_floating, pa.float32()),
    "external_label": ("int64", pa.types.is_integer, pa.int64()),
}


def _array(table: pa.Table, name: str) -> pa.Array:
    return single_array(table.column(name))


def _scalar(table: pa.Table, name: str, keys: dict[str, pa.Array]) -> pa.Array:
    col = _array(table, name)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    expected, accepts, arrow_type = _SCALAR_KINDS[name]
    if not accepts(col.type) and not (pa.types.is_null(col.type) and name in NULLABLE_COLUMNS):
        raise TableError(f"column {name!r} has type {col.type}, expected {expected}")
    if col.null_count and name not in NULLABLE_COLUMNS:
        row = _first(col.is_null())
        raise TableError(f"column {name!r}: row {row}{_where(keys, row)} is null")
    col = col.cast(arrow_type)
    if pa.types.is_floating(arrow_type):
        _check_finite(col, name, 1, keys)
    return col


def _tensor(
    arr: pa.Array, name: str, shape: tuple[int | None, ...], keys: dict[str, pa.Array], row_stride: int = 1
) -> tuple[pa.Array, tuple[int, ...]]:
    """Cast a (nested) list column to fixed_size_list<float32> with the given per-row shape.

    `shape` holds the expected size of each nesting level (None: infer from the data); `row_stride` is
    how many entries of this level make one table row, to report errors by table row.
    """
    listlike = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    if not any(is_type(arr.type) for is_type in listlike):
        raise TableError(
            f"column {name!r} has type {arr.type}, expected a list of float32 with shape ({TENSOR_DIMS[name]})"
        )
    if arr.null_count:
        row = _first(arr.is_null()) // row_stride
        raise TableError(f"column {name!r}: row {row}{_where(keys, row)} is null")
    expected = shape[0]
    suffix = " (num_classes)" if len(shape) == 1 and name not in VECTOR_COLUMNS else ""
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        if expected is not None and size != expected:
            raise TableError(f"column {name!r} has {size} values per entry, expected {expected}{suffix}")
    else:
        lengths = pc.list_value_length(arr).to_numpy()
        size = expected if expected is not None else int(lengths[0])
        bad = np.flatnonzero(lengths != size)
        if len(bad):
            row = int(bad[0]) // row_stride
            raise TableError(
                f"column {name!r}: row {row}{_where(keys, row)} has {lengths[bad[0]]} values, "
                f"expected {size}{suffix}"
            )
    child = arr.flatten()
    if len(shape) > 1:
        inner, inner_shape = _tensor(child, name, shape[1:], keys, row_stride * size)
    else:
        if not pa.types.is_floating(child.type):
            raise TableError(f"column {name!r} holds {child.type} values, expected float32")
        if child.null_count:
            row = _first(child.is_null()) // (row_stride * size)
            raise TableError(f"column {name!r}: row {row}{_where(keys, row)} contains null")
        inner, inner_shape = child.cast(pa.float32()), ()
        _check_finite(inner, name, row_stride * size, keys)
    return pa.FixedSizeListArray.from_arrays(inner, size), (size, *inner_shape)


def _check_finite(values: pa.Array, name: str, per_row: int, keys: dict[str, pa.Array]) -> None:
    flat = values.to_numpy(zero_copy_only=False)  # nulls read as NaN: mask them out below
    bad = ~np.isfinite(flat)
    if values.null_count:
        bad &= values.is_valid().to_numpy(zero_copy_only=False)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        row = first // per_row
        raise TableError(
            f"column {name!r}: row {row}{_where(keys, row)} contains {flat[first]} (values must be finite)"
        )


def _check_class_range(out: dict[str, pa.Array], name: str, num_classes: int) -> None:
    values = out[name].fill_null(0).to_numpy()
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if len(bad):
        row = int(bad[0])
        raise TableError(
            f"column {name!r}: row {row}{_where(out, row)} is {values[row]}, "
            f"expected 0 <= {name} < {num_classes} (num_classes)"
        )


def _first(mask: pa.Array) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def _check_unique_keys(out: dict[str, pa.Array]) -> None:
    keys = pd.DataFrame({c: out[c].to_numpy(zero_copy_only=False) for c in ("split", "attack", "sample_id")})
    dup = keys.duplicated(keep=False).to_numpy()
    if dup.any():
        first = int(np.flatnonzero(dup)[0])
        same = keys.iloc[first]
        rows = np.flatnonzero(dup & (keys == same).all(axis=1).to_numpy())
        raise TableError(
            f"duplicate row for (split={same['split']!r}, attack={same['attack']!r}, "
            f"sample_id={int(same['sample_id'])}) at rows {int(rows[0])} and {int(rows[1])}"
        )


def _class_names(names: Any, num_classes: int) -> list[str]:
    if names is None:
        return [str(i) for i in range(num_classes)]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TableError("metadata 'class_names' must be a list of strings")
    if len(names) != num_classes:
        raise TableError(f"metadata 'class_names' has {len(names)} names, expected {num_classes} (num_classes)")
    if len(set(names)) != len(names):
        raise TableError("metadata 'class_names' has duplicate names")
    return names


def _where(keys: dict[str, pa.Array], row: int) -> str:
    """`` (split='test', attack='pgd', sample_id=7)`` for error messages, from whichever keys are known."""
    parts = [f"{c}={keys[c][row].as_py()!r}" for c in ("split", "attack", "sample_id") if c in keys]
    return f" ({', '.join(parts)})" if parts else ""
