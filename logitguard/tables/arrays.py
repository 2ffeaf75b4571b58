"""Arrow <-> NumPy helpers shared by the table, its validation and reading: one array per column,
zero-copy views of tensor columns, string codes, and the arrays a table is built from.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import TableError


def string_codes(column: pa.ChunkedArray, lookup: dict[str, int]) -> np.ndarray:
    """Integer codes (int32) of a string column's values, extending `lookup` (name -> code) as names appear."""
    encoded = pc.dictionary_encode(single_array(column))
    mapping = np.array([lookup.setdefault(name, len(lookup)) for name in encoded.dictionary.to_pylist()],
                       dtype=np.int32)
    return mapping[encoded.indices.to_numpy(zero_copy_only=False)] if len(mapping) else \
        np.zeros(len(encoded), dtype=np.int32)


def single_array(col: pa.ChunkedArray) -> pa.Array:
    """The column as one Array: free for a single chunk, one concatenation otherwise."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def tensor_view(col: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    arr = single_array(col)
    for _ in shape:
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=True).reshape(-1, *shape)


def int_view(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = single_array(col)
    if col.null_count:
        return col.fill_null(-1).to_numpy()
    return col.to_numpy(zero_copy_only=True)


def distinct_values(values: np.ndarray, first: str | None = None) -> list[str]:
    """The distinct names in `values` (N,), sorted, with `first` (when present) moved to the front."""
    names = sorted(set(values.tolist()))
    if first in names:
        names.remove(first)
        names.insert(0, first)
    return names


def string_column(value, n: int, name: str) -> pa.Array:
    if isinstance(value, str):
        return pa.array([value] * n, pa.string())
    arr = np.asarray(value)
    if arr.shape != (n,):
        raise TableError(f"{name} must be a string or an array of shape ({n},), got shape {arr.shape}")
    return pa.array(arr.astype(str), pa.string())


def label_array(label, n: int) -> pa.Array:
    if label is None:
        return pa.nulls(n, pa.int64())
    label = np.asarray(label).astype(np.int64, copy=False)
    return pa.array(label, mask=label < 0)


def tensor_array(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        raise TableError(f"tensor columns must be floating point, got dtype {values.dtype}")
    arr: pa.Array = pa.array(values.astype(np.float32, copy=False).ravel())
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr
