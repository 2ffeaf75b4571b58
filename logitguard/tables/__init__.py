"""The logit table: the one interface between producers and the core.

A logit table is a Parquet file, or a directory of Parquet files (hive partitions such as
``split=test/attack=pgd/`` allowed), with one row per (sample, attack). The contract is documented in
``docs/tables.md``; this module is its only implementation: reading, validating, writing, pairing and
converting to pandas.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .._io import atomic_output, staged_output
from ..errors import TableError

SCHEMA_VERSION = 1
METADATA_KEY = b"logitguard"
CLEAN = "clean"
REQUIRED_COLUMNS = ("sample_id", "split", "attack", "label", "logits")
OPTIONAL_COLUMNS = ("noisy_logits", "pred", "success", "linf", "l2", "features", "insen", "external_score",
                    "external_label", "flagged")
PARTITION_COLUMNS = ("split", "attack")
# Columns that may hold nulls; all others must be complete.
NULLABLE_COLUMNS = frozenset({"label", "pred", "success", "linf", "l2"})
# Per-row float vectors of a free length (F), besides the logits and noise queries.
VECTOR_COLUMNS = ("features", "insen")
# Float columns stored with BYTE_STREAM_SPLIT (+zstd): it compresses float32 noticeably better.
_FLOAT_LEAVES = {
    "logits": "logits.list.element",
    "noisy_logits": "noisy_logits.list.element.list.element",
    "features": "features.list.element",
    "insen": "insen.list.element",
    "external_score": "external_score",
    "linf": "linf",
    "l2": "l2",
}
_TARGET_ROW_GROUP_BYTES = 64 << 20
# Metadata keys holding one entry per attack partition: each file describes its own partitions, so a
# dataset's files are united on these keys rather than required to agree.
_UNITED_METADATA = ("attacks", "threat")
_TENSOR_DIMS = {"logits": "C", "noisy_logits": "K x C", "features": "F", "insen": "S"}  # per-row shapes, for messages
# Every data page is written with a CRC32 and verified on read: a damaged page is an error, not other logits.
# (Files written without checksums, by older versions or other tools, are read as before.)
_PARQUET = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))
# Streaming reads one row group's column chunks at a time instead of pre-buffering several (less memory,
# and on a local disk no slower).
_STREAM_SCAN = ds.ParquetFragmentScanOptions(page_checksum_verification=True, pre_buffer=False)


# ---------------------------------------------------------------------------------------------
# The in-memory table


class _Rows:
    """What a table and its logit-free keys (`RowKeys`) both derive from ``metadata``, ``attack``, ``split``."""

    metadata: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @cached_property
    def attacks(self) -> list[str]:
        """Distinct attack names, ``clean`` first, then in sorted order."""
        return distinct_values(self.attack, first=CLEAN)

    @cached_property
    def splits(self) -> list[str]:
        return distinct_values(self.split)


@dataclass(frozen=True, eq=False)
class LogitTable(_Rows):
    """A validated logit table held as one Arrow table, with NumPy views of its columns.

    Build one with `read_table` or `LogitTable.from_arrays`; the constructor assumes `arrow` already
    conforms to the contract. Array properties are zero-copy views of the Arrow buffers wherever the
    column is a single chunk without nulls (always true after `read_table` of a single file).

    Attributes
    ----------
    arrow : pyarrow.Table
        The conformed table (canonical column types, one chunk per column).
    metadata : dict
        Schema metadata (``num_classes``, ``class_names``, ``attacks``, ``noise``, ...).
    """

    arrow: pa.Table
    metadata: dict[str, Any]

    @classmethod
    def from_arrays(
        cls,
        *,
        logits: np.ndarray,
        sample_id: np.ndarray,
        split: str | Sequence[str] | np.ndarray,
        attack: str | Sequence[str] | np.ndarray,
        label: np.ndarray | None = None,
        metadata: Mapping[str, Any] | None = None,
        **optional: np.ndarray | None,
    ) -> LogitTable:
        """Build and validate a table from arrays.

        Parameters
        ----------
        logits : array of shape (N, C)
        sample_id : int array of shape (N,)
        split, attack : a string for every row, or an array of shape (N,)
        label : int array of shape (N,), optional; negative values mean "unknown" (stored as null).
        metadata : dict, optional; ``num_classes`` and ``class_names`` are filled in when absent.
        **optional : optional columns: ``noisy_logits`` (N, K, C), ``pred`` (N,), ``success`` (N,),
            ``linf`` (N,), ``l2`` (N,), ``features`` (N, F), ``insen`` (N, S), ``external_score`` (N,),
            ``external_label`` (N,), ``flagged`` (N,).
        """
        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise TableError(f"logits must have shape (N, C), got shape {logits.shape}")
        n = len(logits)
        unknown = sorted(set(optional) - set(OPTIONAL_COLUMNS))
        if unknown:
            raise TableError(f"unknown optional column(s) {unknown}; allowed: {list(OPTIONAL_COLUMNS)}")
        columns: dict[str, pa.Array] = {
            "sample_id": pa.array(np.asarray(sample_id)),
            "split": _string_column(split, n, "split"),
            "attack": _string_column(attack, n, "attack"),
            "label": _label_array(label, n),
            "logits": _tensor_array(logits),
        }
        for name in OPTIONAL_COLUMNS:
            value = optional.get(name)
            if value is None:
                continue
            value = np.asarray(value)
            columns[name] = _tensor_array(value) if value.ndim > 1 else pa.array(value)
        lengths = {name: len(col) for name, col in columns.items()}
        if len(set(lengths.values())) > 1:
            raise TableError(f"columns have different lengths: {lengths}")
        return conform(pa.table(columns), metadata=dict(metadata or {}))

    # -- shape and metadata ------------------------------------------------------------------

    def __len__(self) -> int:
        return self.arrow.num_rows

    @property
    def columns(self) -> list[str]:
        return list(self.arrow.column_names)

    # -- column views --------------------------------------------------------------------------

    @cached_property
    def logits(self) -> np.ndarray:
        """float32 array of shape (N, C)."""
        return _tensor_view(self.arrow.column("logits"), (self.num_classes,))

    @cached_property
    def noisy_logits(self) -> np.ndarray | None:
        """float32 array of shape (N, K, C): logits of K noise-perturbed copies of each input."""
        if "noisy_logits" not in self.arrow.column_names:
            return None
        col = self.arrow.column("noisy_logits")
        return _tensor_view(col, (col.type.list_size, self.num_classes))

    @cached_property
    def features(self) -> np.ndarray | None:
        """float32 array of shape (N, F): penultimate-layer activations, or None."""
        return self._vector("features")

    @cached_property
    def insen(self) -> np.ndarray | None:
        """float32 array of shape (N, S): input-sensitivity statistics (docs/tables.md), or None."""
        return self._vector("insen")

    def _vector(self, name: str) -> np.ndarray | None:
        if name not in self.arrow.column_names:
            return None
        col = self.arrow.column(name)
        return _tensor_view(col, (col.type.list_size,))

    @cached_property
    def labels(self) -> np.ndarray:
        """int64 array of shape (N,); -1 where the ground truth is unknown (deployment data)."""
        return _int_view(self.arrow.column("label"))

    @cached_property
    def sample_id(self) -> np.ndarray:
        return _int_view(self.arrow.column("sample_id"))

    @cached_property
    def split(self) -> np.ndarray:
        """Object array of shape (N,) with each row's split name."""
        return self.arrow.column("split").to_numpy()

    @cached_property
    def attack(self) -> np.ndarray:
        """Object array of shape (N,) with each row's attack name (``clean`` for unattacked rows)."""
        return self.arrow.column("attack").to_numpy()

    def column(self, name: str) -> np.ndarray | None:
        """A scalar optional column (``pred``, ``success``, ``linf``, ``l2``, ``external_*``) as NumPy, or None.

        Integer nulls become -1 and float nulls NaN; boolean nulls become False.
        """
        if name not in self.arrow.column_names:
            return None
        col = self.arrow.column(name)
        if pa.types.is_integer(col.type):
            return _int_view(col)
        if pa.types.is_boolean(col.type):
            return col.fill_null(False).to_numpy()
        return col.to_numpy()  # floats: nulls become NaN

    @property
    def has_labels(self) -> bool:
        """True when every row has a ground-truth label."""
        return self.arrow.column("label").null_count == 0

    # -- row selection -------------------------------------------------------------------------

    def take(self, indices: np.ndarray) -> LogitTable:
        """Rows at `indices` (int array or boolean mask of shape (N,)), metadata unchanged."""
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        return LogitTable(self.arrow.take(pa.array(indices, pa.int64())).combine_chunks(), self.metadata)

    def select(self, *, split: str | None = None, attacks: str | Sequence[str] | None = None) -> LogitTable:
        """Rows of one split and/or some attacks; raises `TableError` when nothing matches."""
        return self.take(_selection(self, split, attacks))


def _selection(table: LogitTable | RowKeys, split: str | None, attacks: str | Sequence[str] | None) -> np.ndarray:
    """The (N,) mask of `select`; raises `TableError` when nothing matches."""
    mask = np.ones(len(table), dtype=bool)
    if split is not None:
        mask &= table.split == split
    if attacks is not None:
        attacks = [attacks] if isinstance(attacks, str) else list(attacks)
        mask &= np.isin(table.attack, attacks)
    if not mask.any():
        raise TableError(
            f"no rows match split={split!r}, attacks={attacks!r}; "
            f"the table has splits {table.splits} and attacks {table.attacks}"
        )
    return mask


@dataclass(frozen=True, eq=False)
class RowKeys(_Rows):
    """A table's rows without their logits: keys, labels and per-row `values` of shape (N,).

    What pairing (`pair_rows`), `select` and per-attack metrics need, tens of bytes per row, so it can be
    held for any table while the logits stream past (`RowCollector` builds one batch by batch; `of` takes
    one from a `LogitTable`). `values` holds per-row results such as predictions or scores.
    """

    split: np.ndarray  # object (N,)
    attack: np.ndarray  # object (N,)
    sample_id: np.ndarray  # int64 (N,)
    labels: np.ndarray  # int64 (N,), -1 where unknown
    metadata: dict[str, Any]
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, table: LogitTable, **values: np.ndarray) -> RowKeys:
        """The keys of `table`'s rows (views, no copy) with `values` attached."""
        return cls(table.split, table.attack, table.sample_id, table.labels, table.metadata, dict(values))

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all())

    def take(self, indices: np.ndarray) -> RowKeys:
        """Rows at `indices` (int array or boolean mask), values included."""
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        return RowKeys(self.split[indices], self.attack[indices], self.sample_id[indices], self.labels[indices],
                       self.metadata, {k: v[indices] for k, v in self.values.items()})

    def select(self, *, split: str | None = None, attacks: str | Sequence[str] | None = None) -> RowKeys:
        """As `LogitTable.select`: rows of one split and/or some attacks; `TableError` when nothing matches."""
        return self.take(_selection(self, split, attacks))


class RowCollector:
    """Builds `RowKeys` from streamed batches: ``add(batch, name=array, …)`` per batch, then `finish`.

    Split and attack names are kept as small integer codes while collecting. `finish` checks that the
    keys are unique over the whole stream (each batch was only checked on its own).
    """

    def __init__(self) -> None:
        self._names: dict[str, dict[str, int]] = {"split": {}, "attack": {}}
        self._parts: dict[str, list[np.ndarray]] = {}
        self.metadata: dict[str, Any] | None = None
        self.rows = 0
        self._finished: RowKeys | None = None

    def add(self, batch: LogitTable, **values: np.ndarray) -> None:
        parts = {"split": _codes(batch.arrow.column("split"), self._names["split"]),
                 "attack": _codes(batch.arrow.column("attack"), self._names["attack"]),
                 "sample_id": np.array(batch.sample_id), "labels": np.array(batch.labels),
                 **{f"value:{k}": np.asarray(v) for k, v in values.items()}}
        if self.rows and set(parts) != set(self._parts):
            raise ValueError(f"every batch needs the same values; got {sorted(values)}")
        for name, part in parts.items():
            if len(part) != len(batch):
                raise ValueError(f"value {name!r} has {len(part)} entries for a batch of {len(batch)} rows")
            self._parts.setdefault(name, []).append(part)
        self.metadata = batch.metadata
        self.rows += len(batch)

    def finish(self) -> RowKeys:
        """The collected rows (the same object on every call once no batch was added since)."""
        if self._finished is not None and len(self._finished) == self.rows:
            return self._finished
        if self.metadata is None:
            raise TableError("no rows were read")
        whole = {name: np.concatenate(parts) for name, parts in self._parts.items()}
        self._parts = {name: [part] for name, part in whole.items()}  # one copy, and more batches may follow
        names = {c: np.array(list(lookup), dtype=object) for c, lookup in self._names.items()}
        dup = _duplicate_rows(whole["split"], whole["attack"], whole["sample_id"])
        if dup is not None:
            first, second = dup
            raise TableError(
                f"duplicate row for (split={names['split'][whole['split'][first]]!r}, "
                f"attack={names['attack'][whole['attack'][first]]!r}, sample_id={int(whole['sample_id'][first])}) "
                f"at rows {first} and {second}"
            )
        self._finished = RowKeys(names["split"][whole["split"]], names["attack"][whole["attack"]], whole["sample_id"],
                                 whole["labels"], self.metadata,
                                 {name[6:]: part for name, part in whole.items() if name.startswith("value:")})
        return self._finished


def _codes(column: pa.ChunkedArray, lookup: dict[str, int]) -> np.ndarray:
    """Integer codes (int32) of a string column's values, extending `lookup` (name -> code) as names appear."""
    encoded = pc.dictionary_encode(_single(column))
    mapping = np.array([lookup.setdefault(name, len(lookup)) for name in encoded.dictionary.to_pylist()],
                       dtype=np.int32)
    return mapping[encoded.indices.to_numpy(zero_copy_only=False)] if len(mapping) else \
        np.zeros(len(encoded), dtype=np.int32)


def _duplicate_rows(*keys: np.ndarray) -> tuple[int, int] | None:
    """The first two row numbers sharing all `keys` (integer arrays), or None."""
    frame = pd.DataFrame({str(i): k for i, k in enumerate(keys)})
    dup = frame.duplicated(keep=False).to_numpy()
    if not dup.any():
        return None
    first = int(np.flatnonzero(dup)[0])
    same = np.flatnonzero(dup & (frame == frame.iloc[first]).all(axis=1).to_numpy())
    return int(same[0]), int(same[1])


# ---------------------------------------------------------------------------------------------
# Reading


def read_table(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    attacks: str | Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
) -> LogitTable:
    """Read and validate a logit table from a Parquet file or a directory of Parquet files.

    Parameters
    ----------
    path : a ``.parquet`` file or a directory (hive partitions ``split=…/attack=…`` allowed).
    split : keep only this split.
    attacks : keep only these attacks (a name or a list of names).
    columns : optional columns to read besides the required ones (default: all that are present).
        Pass ``[]`` to skip the large ``noisy_logits`` and ``features`` columns.

    Raises
    ------
    TableError : the path is missing or unreadable, a requested split/attack/column is absent, nothing
        matches the filters, or the table breaks the contract.
    """
    path = Path(path)
    dataset, file_schemas = open_dataset(path)
    metadata = dataset_metadata(file_schemas, path)
    present = set(dataset.schema.names)
    wanted = wanted_columns(path, present, columns)
    if attacks is not None:
        attacks = [attacks] if isinstance(attacks, str) else list(attacks)
    check_columns(present)
    try:
        batches = list(_scan(dataset, [*REQUIRED_COLUMNS, *wanted], split, attacks))
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_error(path, exc) from None
    arrow = pa.Table.from_batches(batches) if batches else None
    if arrow is None or arrow.num_rows == 0:
        raise _no_rows(dataset, path, split, attacks)
    return conform(arrow, metadata=metadata)


def _no_rows(dataset: ds.Dataset, path: Path, split: str | None, attacks: list[str] | None) -> TableError:
    """The error for a read that matched no row: the table is empty, or says which splits and attacks it has."""
    if split is None and attacks is None:
        return TableError(f"{path}: the table has no rows")
    try:
        keys = dataset.to_table(columns=["split", "attack"])
    except (pa.ArrowException, OSError) as exc:
        return unreadable_error(path, exc)
    return TableError(
        f"{path}: no rows match split={split!r}, attacks={attacks!r}; the table has splits "
        f"{distinct_values(keys.column('split').to_numpy())} and attacks "
        f"{distinct_values(keys.column('attack').to_numpy(), first=CLEAN)}"
    )


def wanted_columns(path: Path, present: Sequence[str], columns: Sequence[str] | None) -> list[str]:
    """The optional columns to read: all `present` ones when `columns` is None, else `columns`, each checked."""
    if columns is None:
        return [c for c in OPTIONAL_COLUMNS if c in present]
    unknown = [c for c in columns if c not in OPTIONAL_COLUMNS]
    if unknown:
        raise TableError(f"unknown optional column(s) {unknown}; allowed: {list(OPTIONAL_COLUMNS)}")
    missing = [c for c in columns if c not in present]
    if missing:
        raise TableError(f"{path}: requested column(s) {missing} not in the table")
    return list(columns)


def iter_batches(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    attacks: str | Sequence[str] | None = None,
    columns: Sequence[str] = (),
    batch_rows: int = 16384,
    require_rows: bool = False,
) -> Iterator[LogitTable]:
    """Stream a table as validated `LogitTable` batches of at most `batch_rows` rows, in file order.

    For tables larger than memory: only one batch is held at a time (the reader decodes at most a couple
    of batches ahead). `columns` lists the optional columns to read (default none: keys, labels and
    logits only). Filters as in `read_table`; a filter that matches nothing yields nothing, or with
    `require_rows` raises `read_table`'s `TableError`. The same arguments give the same rows in the same
    order every time, so a table can be streamed in several passes. Each batch is validated on its own:
    a key repeated in two batches is only found by a check over all keys (`RowCollector`).
    """
    path = Path(path)
    if batch_rows < 1:
        raise TableError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
    dataset, file_schemas = open_dataset(path)
    metadata = dataset_metadata(file_schemas, path)
    check_columns(dataset.schema.names)
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise TableError(f"{path}: requested column(s) {missing} not in the table")
    if attacks is not None:
        attacks = [attacks] if isinstance(attacks, str) else list(attacks)
    empty, count = True, 0
    try:
        # Readahead bounded: pyarrow's defaults (16 batches, 4 files, pre-buffered) hold several row groups.
        for batch in _scan(dataset, [*REQUIRED_COLUMNS, *columns], split, attacks, batch_size=batch_rows,
                           batch_readahead=1, fragment_readahead=1, fragment_scan_options=_STREAM_SCAN):
            if batch.num_rows:
                empty = False
                yield conform(pa.Table.from_batches([batch]), metadata=metadata)
                count += 1
                if count % 8 == 0:  # the allocator keeps freed batches' memory otherwise (~100 MiB at C=1000)
                    pa.default_memory_pool().release_unused()
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_error(path, exc) from None
    if empty and require_rows:
        raise _no_rows(dataset, path, split, attacks)


def table_columns(path: str | os.PathLike) -> list[str]:
    """The column names of the table at `path`, read from the file footers only."""
    dataset, _ = open_dataset(Path(path))
    return list(dataset.schema.names)


def row_counts(path: str | os.PathLike, *, split: str | None = None) -> dict[str, int]:
    """Rows per attack (reading only the key columns), e.g. ``{"clean": 10000, "pgd": 10000}``."""
    path = Path(path)
    dataset, _ = open_dataset(path)
    try:
        keys = dataset.to_table(columns=["attack"], filter=_filter(split, None)).column("attack")
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_error(path, exc) from None
    counts = pd.Series(keys.to_numpy(zero_copy_only=False)).value_counts()
    return {name: int(counts[name]) for name in distinct_values(counts.index.to_numpy(), first=CLEAN)}


def read_keys(path: str | os.PathLike, *, split: str | None = None,
              attacks: str | Sequence[str] | None = None) -> RowKeys:
    """The keys and labels of the matching rows (reading only those columns, never the logits), in the
    order `read_table` and `iter_batches` give them. Raises `read_table`'s `TableError` when nothing matches."""
    path = Path(path)
    dataset, file_schemas = open_dataset(path)
    metadata = dataset_metadata(file_schemas, path)
    check_columns(dataset.schema.names)
    if attacks is not None:
        attacks = [attacks] if isinstance(attacks, str) else list(attacks)
    try:
        batches = list(_scan(dataset, ["split", "attack", "sample_id", "label"], split, attacks))
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_error(path, exc) from None
    keys = pa.Table.from_batches(batches) if batches else None
    if keys is None or keys.num_rows == 0:
        raise _no_rows(dataset, path, split, attacks)
    names = {}
    for c in ("split", "attack"):
        lookup: dict[str, int] = {}
        codes = _codes(keys.column(c), lookup)
        names[c] = np.array(list(lookup), dtype=object)[codes]
    if "num_classes" not in metadata:  # as `conform` fills it in: from the logits' list size
        kind = dataset.schema.field("logits").type
        if pa.types.is_fixed_size_list(kind):
            metadata["num_classes"] = kind.list_size
        else:
            for batch in iter_batches(path, batch_rows=1):
                metadata["num_classes"] = batch.num_classes
                break
    metadata.setdefault("class_names", [str(i) for i in range(int(metadata["num_classes"]))])
    label = _single(keys.column("label"))
    labels = label.cast(pa.int64()).fill_null(-1).to_numpy() if not pa.types.is_null(label.type) else \
        np.full(keys.num_rows, -1, dtype=np.int64)
    return RowKeys(names["split"], names["attack"], _single(keys.column("sample_id")).cast(pa.int64()).to_numpy(),
                   labels, metadata)


# Streamed commands read batches of about this many bytes of float32 tensors (logits, noise queries, features).
STREAM_BATCH_BYTES = 8 << 20
BATCH_ROWS_ENV = "LOGITGUARD_BATCH_ROWS"


def stream_batch_rows(path: str | os.PathLike, columns: Sequence[str] = ()) -> int:
    """Rows per batch for streaming `path` with optional `columns`: about `STREAM_BATCH_BYTES` of tensors per
    batch (2097 rows of 1000 logits), between 256 and 65536 rows. The environment variable
    ``LOGITGUARD_BATCH_ROWS`` overrides it (tests use it to force many batches)."""
    override = os.environ.get(BATCH_ROWS_ENV)
    if override:
        try:
            rows = int(override)
        except ValueError:
            rows = 0
        if rows < 1:
            raise TableError(f"{BATCH_ROWS_ENV} must be an integer >= 1, got {override!r}")
        return rows
    dataset, file_schemas = open_dataset(Path(path))
    num_classes = dataset_metadata(file_schemas, Path(path)).get("num_classes")
    floats = 0
    for name in ("logits", *columns):
        if name not in dataset.schema.names:
            continue
        size, kind = 1, dataset.schema.field(name).type
        while pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
            # variable-length lists: assume C per level (the inner level of noisy_logits is C; K is unknown)
            size *= kind.list_size if pa.types.is_fixed_size_list(kind) else int(num_classes or 1000)
            kind = kind.value_type
        floats += size
    return int(min(65536, max(256, STREAM_BATCH_BYTES // (4 * max(floats, 1)))))


def noise_queries(path: str | os.PathLike) -> tuple[int, int] | None:
    """(K, C) of the table's noise queries, or None when it has none; read from the schema (one batch of the
    column when its lists are not fixed-size)."""
    dataset, _ = open_dataset(Path(path))
    if "noisy_logits" not in dataset.schema.names:
        return None
    kind = dataset.schema.field("noisy_logits").type
    if pa.types.is_fixed_size_list(kind) and pa.types.is_fixed_size_list(kind.value_type):
        return kind.list_size, kind.value_type.list_size
    for batch in iter_batches(path, columns=["noisy_logits"], batch_rows=1):
        return tuple(batch.noisy_logits.shape[1:])
    return None


def _scan(dataset: ds.Dataset, columns: list[str], split: str | None, attacks: list[str] | None,
          **options: Any) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns` for the rows of `split` and `attacks`, in file order.

    pyarrow prunes files and partitions with the filter, but rows are filtered here: pyarrow's filter and
    take kernels (pyarrow 26) misread a fixed_size_list of fixed_size_list (``noisy_logits``) whose batch
    is a slice of a larger one (a row group larger than the batch), returning other rows' noise queries.
    Such columns are rebuilt from their values (no copy) before the rows are filtered.
    """
    expr = _filter(split, attacks)
    if expr is None:
        yield from dataset.to_batches(columns=columns, **options)
        return
    source = ds.FileSystemDataset(list(dataset.get_fragments(filter=expr)), dataset.schema, dataset.format,
                                  dataset.filesystem)
    read = [*columns, *(c for c in ("split", "attack") if c not in columns)]
    for batch in source.to_batches(columns=read, **options):
        keep = None
        if split is not None:
            keep = pc.equal(_names(batch.column("split")), split)
        if attacks is not None:
            chosen = pc.is_in(_names(batch.column("attack")), value_set=pa.array(attacks, pa.string()))
            keep = chosen if keep is None else pc.and_(keep, chosen)
        keep = keep.fill_null(False)
        if not pc.all(keep).as_py():
            batch = pa.RecordBatch.from_arrays([_unsliced(c) for c in batch.columns], schema=batch.schema).filter(keep)
        yield batch.select(columns)


def _names(column: pa.Array) -> pa.Array:
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _unsliced(column: pa.Array) -> pa.Array:
    """A fixed_size_list of fixed_size_list rebuilt from its own values (children without offsets)."""
    kind = column.type
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_fixed_size_list(kind.value_type)):
        return column
    inner = column.flatten()
    if column.null_count or inner.null_count:
        return column  # null entries are refused by `conform` anyway
    values = inner.flatten()
    return pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(values, type=kind.value_type),
                                             type=kind)


def _filter(split: str | None, attacks: str | Sequence[str] | None) -> ds.Expression | None:
    expr = None
    if split is not None:
        expr = ds.field("split") == split
    if attacks is not None:
        in_attacks = ds.field("attack").isin([attacks] if isinstance(attacks, str) else list(attacks))
        expr = in_attacks if expr is None else expr & in_attacks
    return expr


def open_dataset(path: Path) -> tuple[ds.FileSystemDataset, dict[str, pa.Schema]]:
    """The Parquet dataset at `path` and each file's own schema (read once, from the footers).

    A directory's dataset gets one schema unified over all its files: pyarrow would otherwise take the
    first file's schema and silently drop a column that the first file lacks.
    """
    if not path.exists():
        raise TableError(f"no such file or directory: {path}")
    try:
        if not path.is_dir():
            dataset = ds.dataset(str(path), format=_PARQUET)
            return dataset, {str(path): dataset.schema}
        files = table_files(path)
        if not files:
            raise TableError(f"{path}: directory holds no .parquet files")
        options = dict(format=_PARQUET, partitioning=ds.HivePartitioning.discover(infer_dictionary=False),
                       partition_base_dir=str(path))
        first = ds.dataset(files, **options)
        schemas = {f.path: f.physical_schema for f in first.get_fragments()}
        # Partition values are names: read them as strings (discovery would make a split "2024" an int32).
        partition_fields = [pa.field(f.name, pa.string()) for f in first.schema
                            if all(f.name not in s.names for s in schemas.values())]
        options["partitioning"] = ds.HivePartitioning(pa.schema(partition_fields))
        try:
            schema = pa.unify_schemas([*schemas.values(), pa.schema(partition_fields)])
        except pa.ArrowException as exc:
            raise TableError(f"{path}: files have incompatible schemas ({exc})") from None
        return ds.dataset(files, schema=schema, **options), schemas
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_error(path, exc) from None


def unreadable_error(path: Path, exc: Exception) -> TableError:
    """The error for a table pyarrow cannot read; a failed page checksum says the file is damaged."""
    if "checksum" in str(exc).lower():
        return TableError(f"{path}: a data page is damaged (its checksum does not match: {exc}); "
                          "the table cannot be trusted, restore or rewrite it")
    return TableError(f"{path}: not a readable Parquet table ({exc})")


def table_files(path: str | os.PathLike) -> list[str]:
    """The Parquet files of a table directory, sorted: hidden entries (a name, file or directory, that
    starts with ``.`` or ``_``) are not part of the table."""
    path = Path(path)
    return sorted(str(p) for p in path.rglob("*.parquet")
                  if not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))


def dataset_metadata(file_schemas: dict[str, pa.Schema], path: Path) -> dict[str, Any]:
    """Merge every file's metadata: ``attacks`` and ``threat`` entries are united; every other key must agree."""
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    for file, schema in file_schemas.items():
        meta = parse_metadata((schema.metadata or {}).get(METADATA_KEY), file)
        for key, value in meta.items():
            if key in _UNITED_METADATA:
                merged.setdefault(key, {}).update(value)
            elif key not in merged:
                merged[key], source[key] = value, file
            elif merged[key] != value:
                raise TableError(
                    f"{path}: files disagree on metadata {key!r}: {source[key]} has {merged[key]!r}, "
                    f"{file} has {value!r}"
                )
    return merged


def parse_metadata(raw: bytes | None, where: str) -> dict[str, Any]:
    """The table metadata dict stored as JSON bytes under `METADATA_KEY` ({} when absent); `where` names the
    file in the error for bytes that are not a JSON object."""
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TableError(f"{where}: schema metadata 'logitguard' is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise TableError(f"{where}: schema metadata 'logitguard' must be a JSON object")
    return meta


# ---------------------------------------------------------------------------------------------
# Validation


def check_columns(names: set[str] | list[str]) -> None:
    """Refuse (`TableError`) a set of column names that lacks a required column or has an unknown one."""
    names = set(names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise TableError(f"missing required column(s) {missing}")
    extra = sorted(names - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS))
    if extra:
        raise TableError(
            f"unexpected column(s) {extra}; allowed: {[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS]}"
        )


def conform(table: pa.Table, *, metadata: Mapping[str, Any] | None = None) -> LogitTable:
    """Validate `table` against the contract and cast it to the canonical column types.

    Accepts any integer width for integer columns, string/large_string/dictionary for names, and
    list/large_list/fixed_size_list of any float for tensor columns. Metadata defaults to the table's
    own schema metadata. Raises `TableError` naming the column, the row and what was expected.
    """
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
    num_classes = metadata.get("num_classes")
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
            out[name], _ = _tensor(_array(table, name), name, (None, num_classes), out)
        elif name in VECTOR_COLUMNS:
            out[name], _ = _tensor(_array(table, name), name, (None,), out)
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
    return _single(table.column(name))


def _single(col: pa.ChunkedArray) -> pa.Array:
    """The column as one Array: free for a single chunk, one concatenation otherwise."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


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
            f"column {name!r} has type {arr.type}, expected a list of float32 with shape ({_TENSOR_DIMS[name]})"
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


# ---------------------------------------------------------------------------------------------
# Writing


def write_table(
    table: LogitTable,
    path: str | os.PathLike,
    *,
    partition_by: Sequence[str] | None = None,
    basename: str = "part-0",
    overwrite: bool = False,
) -> list[Path]:
    """Write `table` as Parquet (zstd, byte-stream-split floats, page checksums), atomically.

    Parameters
    ----------
    path : the output file, or with `partition_by` the dataset directory.
    partition_by : e.g. ``("split", "attack")`` writes ``path/split=…/attack=…/{basename}.parquet``,
        one file per partition, without the partition columns (they live in the directory names).
    basename : file name stem inside each partition (e.g. ``shard-0-of-4``).
    overwrite : replace an existing output; otherwise it raises `TableError`. A directory is replaced as a
        whole (no file of the old output survives), and only when it holds nothing but Parquet files.

    A file goes to a temporary sibling renamed into place. A directory is written into a temporary sibling
    directory that is swapped into place at the end, so readers (and a run killed at any point) see either
    the complete old output or the complete new one. Of two runs writing the same `path` at once, one
    raises `TableError` (see `logitguard._io.OutputLock`).

    Returns
    -------
    The list of files written.
    """
    path = Path(path)
    if partition_by is None:
        with atomic_output(path, overwrite=overwrite, error=TableError) as tmp:
            write_parquet(with_metadata(table.arrow, table.metadata), tmp)
        return [path]
    bad = [c for c in partition_by if c not in PARTITION_COLUMNS]
    if bad:
        raise TableError(f"can only partition by {list(PARTITION_COLUMNS)}, not {bad}")
    parts = [(Path(*(f"{c}={v}" for c, v in zip(partition_by, values)), f"{basename}.parquet"),
              part.drop_columns(list(partition_by)))
             for values, part in table_partitions(table, list(partition_by))]
    with staged_output(path, overwrite=overwrite, replace=True, error=TableError) as stage:
        for rel, part in parts:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            write_parquet(with_metadata(part, table.metadata), stage / rel)
    return [path / rel for rel, _ in parts]


def with_metadata(arrow: pa.Table, metadata: dict[str, Any]) -> pa.Table:
    """`arrow` with `metadata` as its schema metadata (JSON under `METADATA_KEY`, keys sorted)."""
    return arrow.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def table_partitions(table: LogitTable, by: list[str]) -> Iterator[tuple[tuple[Any, ...], pa.Table]]:
    """(values of the `by` columns, their rows as Arrow) per partition, in sorted order; refuses values that
    cannot be directory names."""
    for c in by:
        for value in distinct_values(getattr(table, c)):
            if not value or any(ch in value for ch in "/\\=%") or value.startswith("."):
                raise TableError(f"{c} name {value!r} cannot be a directory name; avoid '/', '\\', '=', '%' and a "
                                 "leading '.'")
    keys = pd.DataFrame({c: getattr(table, c) for c in by})
    for values, index in keys.groupby(by, sort=True).indices.items():
        values = values if isinstance(values, tuple) else (values,)
        yield values, table.arrow.take(pa.array(index, pa.int64()))


def write_parquet(arrow: pa.Table, target: Path) -> None:
    """One Parquet file with the table's encodings and a CRC32 on every page (verified by the reader)."""
    pq.write_table(arrow, target, row_group_size=_row_group_rows(arrow), **_parquet_options(arrow.column_names))


def _open_writer(target: Path, schema: pa.Schema) -> pq.ParquetWriter:
    """A Parquet file written row group by row group, with `write_parquet`'s encodings and checksums."""
    return pq.ParquetWriter(target, schema, **_parquet_options(schema.names))


def _parquet_options(columns: Sequence[str]) -> dict[str, Any]:
    return dict(
        compression="zstd",
        use_dictionary=[c for c in PARTITION_COLUMNS if c in columns],
        use_byte_stream_split=[leaf for c, leaf in _FLOAT_LEAVES.items() if c in columns],
        write_page_checksum=True,
    )


def _row_group_rows(arrow: pa.Table) -> int:
    """Rows per row group: about `_TARGET_ROW_GROUP_BYTES` (64 MiB), at least 1024."""
    return max(1024, _TARGET_ROW_GROUP_BYTES // max(1, arrow.nbytes // max(1, arrow.num_rows)))


def write_batches(
    batches: Iterable[LogitTable],
    path: str | os.PathLike,
    *,
    partition_by: Sequence[str] | None = None,
    basename: str = "part-0",
    overwrite: bool = False,
) -> list[Path]:
    """`write_table` for a table that arrives in batches (e.g. from `iter_batches`), holding only about one
    row group per output file in memory.

    Same layout, encodings, checksums and guarantees as `write_table`: a file goes to a temporary sibling
    and a directory into a staging directory, committed whole only once `batches` is exhausted without
    error (an exception, or a kill, leaves the old output as it was). Every batch must have the same
    columns; the first batch's metadata is written. Rows keep their order within each output file. Row
    groups hold about 64 MiB whatever the batch size, so the files do not depend on how the input was cut
    (unless batches interleave many output files: beyond 128 MiB buffered, the largest buffer is written
    as a shorter row group). Raises `TableError` when `batches` yields no rows.
    """
    path = Path(path)
    if partition_by is not None:
        bad = [c for c in partition_by if c not in PARTITION_COLUMNS]
        if bad:
            raise TableError(f"can only partition by {list(PARTITION_COLUMNS)}, not {bad}")
        partition_by = list(partition_by)
        output = staged_output(path, overwrite=overwrite, replace=True, error=TableError)
    else:
        output = atomic_output(path, overwrite=overwrite, error=TableError)
    with output as root:
        sink = _BatchSink(root, partition_by, basename)
        try:
            for batch in batches:
                sink.write(batch)
            sink.finish()
        finally:
            sink.close()
    return [path] if partition_by is None else [path / rel for _, rel in sorted(sink.files)]  # as write_table


class _BatchSink:
    """The Parquet writers of `write_batches`: one per output file, each buffering up to one row group."""

    _MAX_BUFFERED_BYTES = 2 * _TARGET_ROW_GROUP_BYTES  # over all files; the largest buffer is flushed beyond

    def __init__(self, root: Path, partition_by: list[str] | None, basename: str) -> None:
        self.root, self.partition_by, self.basename = root, partition_by, basename
        self.metadata: dict[str, Any] | None = None
        self.files: list[tuple[tuple[str, ...], Path]] = []  # (partition values, path relative to root)
        self._writers: dict[Path, pq.ParquetWriter] = {}
        self._buffers: dict[Path, list[pa.Table]] = {}
        self._group_rows: dict[Path, int] = {}

    def write(self, table: LogitTable) -> None:
        if self.metadata is None:
            self.metadata = table.metadata
        if self.partition_by is None:
            self._add(Path(), table.arrow, ())
            return
        for values, part in table_partitions(table, self.partition_by):
            rel = Path(*(f"{c}={v}" for c, v in zip(self.partition_by, values)), f"{self.basename}.parquet")
            self._add(rel, part.drop_columns(self.partition_by), values)

    def _add(self, rel: Path, arrow: pa.Table, values: tuple[str, ...]) -> None:
        if rel not in self._writers:
            target = self.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self._writers[rel] = _open_writer(target, with_metadata(arrow.schema.empty_table(), self.metadata).schema)
            self._buffers[rel], self._group_rows[rel] = [], _row_group_rows(arrow)
            self.files.append((tuple(values), rel))
        elif not arrow.schema.equals(self._writers[rel].schema, check_metadata=False):
            raise TableError(f"a batch has columns {arrow.schema} but earlier ones had {self._writers[rel].schema}")
        self._buffers[rel].append(arrow)
        if sum(t.num_rows for t in self._buffers[rel]) >= self._group_rows[rel]:
            self._flush(rel, final=False)
        if sum(t.nbytes for parts in self._buffers.values() for t in parts) > self._MAX_BUFFERED_BYTES:
            self._flush(max(self._buffers, key=lambda r: sum(t.nbytes for t in self._buffers[r])), final=True)

    def _flush(self, rel: Path, *, final: bool) -> None:
        parts = self._buffers[rel]
        if not parts:
            return
        whole = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        rows = self._group_rows[rel]
        cut = whole.num_rows if final else whole.num_rows - whole.num_rows % rows
        if cut:
            self._writers[rel].write_table(whole.slice(0, cut), row_group_size=rows)
        self._buffers[rel] = [whole.slice(cut)] if cut < whole.num_rows else []

    def finish(self) -> None:
        if not self._writers:
            raise TableError("nothing to write: no rows")
        for rel in self._writers:
            self._flush(rel, final=True)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


# ---------------------------------------------------------------------------------------------
# Pairing and pandas


class Pair(NamedTuple):
    """Clean and attacked rows of the same samples, aligned row by row on (split, sample_id)."""

    clean: LogitTable
    attacked: LogitTable


def pair(table: LogitTable, attack: str) -> Pair:
    """Align `attack` rows with the clean rows of the same (split, sample_id).

    Samples present in only one of the two are dropped. Raises `TableError` if there is no clean or no
    `attack` row, nothing aligns, or a sample's label differs between its clean and attacked rows.
    """
    clean_rows, attacked_rows = pair_rows(table, attack)
    return Pair(table.take(clean_rows), table.take(attacked_rows))


def pair_rows(table: LogitTable | RowKeys, attack: str) -> tuple[np.ndarray, np.ndarray]:
    """`pair` as row numbers: (clean rows, attacked rows), int arrays of the same length, aligned."""
    for name in (CLEAN, attack):
        if name not in table.attacks:
            raise TableError(f"no {name!r} rows in the table; it has attacks {table.attacks}")
    frames = []
    split = pd.factorize(table.split)[0]  # merging on integer codes: far less memory than on string objects
    for name in (CLEAN, attack):
        rows = np.flatnonzero(table.attack == name)
        frames.append(pd.DataFrame({"split": split[rows], "sample_id": table.sample_id[rows], "row": rows}))
    merged = frames[1].merge(frames[0], on=["split", "sample_id"], suffixes=("_attacked", "_clean"), sort=False)
    if merged.empty:
        raise TableError(f"no {attack!r} row shares a (split, sample_id) with a clean row")
    clean_rows, attacked_rows = merged["row_clean"].to_numpy(), merged["row_attacked"].to_numpy()
    mismatch = np.flatnonzero(table.labels[clean_rows] != table.labels[attacked_rows])
    if len(mismatch):
        i = mismatch[0]
        raise TableError(
            f"sample_id {table.sample_id[clean_rows[i]]} (split {table.split[clean_rows[i]]!r}) has label "
            f"{table.labels[clean_rows[i]]} in clean rows but {table.labels[attacked_rows[i]]} in {attack!r} rows"
        )
    return clean_rows, attacked_rows


def holdout_mask(sample_id: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A deterministic share `fraction` of samples (N,) bool, by a hash of sample id and seed.

    Every row of a sample (clean or attacked, any batch or file) lands on the same side.
    """
    if fraction <= 0:
        return np.zeros(len(sample_id), dtype=bool)
    h = (np.asarray(sample_id, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(31)
    return (h % np.uint64(1 << 20)).astype(np.float64) < fraction * (1 << 20)


def to_pandas(table: LogitTable, wide: bool = False) -> pd.DataFrame:
    """The table as a DataFrame for auditing.

    Long form (default): one row per table row; `logits` (and `noisy_logits`, `features`) hold an
    array per cell. Wide form: `logits` is expanded into one float32 column per class, named by class
    name; other list columns stay as array cells.
    """
    frame = table.arrow.to_pandas()
    frame["label"] = frame["label"].astype("Int64")  # keep nulls visible as <NA>
    if not wide:
        return frame
    clash = sorted(set(table.class_names) & set(frame.columns))
    if clash:
        raise TableError(f"class name(s) {clash} collide with table columns; use wide=False")
    per_class = pd.DataFrame(table.logits, columns=table.class_names, index=frame.index)
    return pd.concat([frame.drop(columns="logits"), per_class], axis=1)


# ---------------------------------------------------------------------------------------------
# Array helpers


def _tensor_view(col: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    arr = _single(col)
    for _ in shape:
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=True).reshape(-1, *shape)


def _int_view(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = _single(col)
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


def _string_column(value, n: int, name: str) -> pa.Array:
    if isinstance(value, str):
        return pa.array([value] * n, pa.string())
    arr = np.asarray(value)
    if arr.shape != (n,):
        raise TableError(f"{name} must be a string or an array of shape ({n},), got shape {arr.shape}")
    return pa.array(arr.astype(str), pa.string())


def _label_array(label, n: int) -> pa.Array:
    if label is None:
        return pa.nulls(n, pa.int64())
    label = np.asarray(label).astype(np.int64, copy=False)
    return pa.array(label, mask=label < 0)


def _tensor_array(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        raise TableError(f"tensor columns must be floating point, got dtype {values.dtype}")
    arr: pa.Array = pa.array(values.astype(np.float32, copy=False).ravel())
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr
