"""Reading tables: whole (`read_table`), in record batches (`iter_batches`), or only their keys, columns and
counts; opening a (partitioned) Parquet dataset and uniting its files' metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from ..errors import TableError
from .arrays import distinct_values, single_array, string_codes
from .validation import check_schema, conform, row_shapes
from .schema import CLEAN, METADATA_KEY, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, parse_metadata
from .source import TableSource
from .scan import partition_filter, scan, stream_files
from .table import LogitTable, RowKeys


# Metadata keys holding one entry per attack partition: each file describes its own partitions, so a
# dataset's files are united on these keys rather than required to agree.
_UNITED_METADATA = ("attacks", "threat")
# Every data page is written with a CRC32 and verified on read: a damaged page is an error, not other logits.
# (Files written without checksums, by older versions or other tools, are read as before.)
_PARQUET = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))


def read_table(
    path: TableSource | str | os.PathLike,
    *,
    split: str | None = None,
    attacks: str | Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
) -> LogitTable:
    """Read and validate a logit table from a Parquet file or a directory of Parquet files.

    Parameters
    ----------
    path : a ``.parquet`` file or a directory (hive partitions ``split=…/attack=…`` allowed), or a
        `TableSource` (its rows only).
    split : keep only this split (narrows a `TableSource`: `TableSource.narrow`).
    attacks : keep only these attacks (a name or a list of names).
    columns : optional columns to read besides the required ones (default: all that are present).
        Pass ``[]`` to skip the large ``noisy_logits`` and ``features`` columns.

    Raises
    ------
    TableError : the path is missing or unreadable, a requested split/attack/column is absent, nothing
        matches the filters, or the table breaks the contract.
    """
    source = TableSource.of(path, split=split, attacks=attacks)
    path = source.path
    dataset, file_schemas = open_dataset(path)
    metadata = dataset_metadata(file_schemas, path)
    present = set(dataset.schema.names)
    wanted = wanted_columns(path, present, columns)
    check_schema(dataset.schema)
    try:
        batches = list(scan(dataset, [*REQUIRED_COLUMNS, *wanted], source))
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_error(path, exc) from None
    arrow = pa.Table.from_batches(batches) if batches else None
    if arrow is None or arrow.num_rows == 0:
        raise _no_rows(dataset, source)
    return conform(arrow, metadata=metadata)


def _no_rows(dataset: ds.Dataset, source: TableSource) -> TableError:
    """The error for a read that matched no row: the table is empty, or says which splits and attacks it has."""
    path, split, attacks = source.path, source.split, None if source.attacks is None else list(source.attacks)
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
    path: TableSource | str | os.PathLike,
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
    order every time, so a table can be streamed in several passes. Each batch is validated as `read_table`
    validates a whole table (column types from the footers first, `check_schema`), and held to the first
    batch's per-row shapes (C, K, F), so a table `read_table` refuses is refused here too; only a key repeated
    in two batches is left to a check over all keys (`RowCollector`).
    """
    source = TableSource.of(path, split=split, attacks=attacks)
    path = source.path
    if batch_rows < 1:
        raise TableError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
    dataset, file_schemas = open_dataset(path)
    metadata = dataset_metadata(file_schemas, path)
    check_schema(dataset.schema)
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise TableError(f"{path}: requested column(s) {missing} not in the table")
    empty, count = True, 0
    shapes: dict[str, tuple[int, ...]] | None = None  # every batch must have the first one's C, K and F
    try:
        for batch in stream_files(dataset, [*REQUIRED_COLUMNS, *columns], source, batch_rows):
            if batch.num_rows:
                empty = False
                table = conform(pa.Table.from_batches([batch]), metadata=metadata, shapes=shapes)
                shapes = shapes or row_shapes(table)
                yield table
                count += 1
                if count % 8 == 0:  # the allocator keeps freed batches' memory otherwise (~100 MiB at C=1000)
                    pa.default_memory_pool().release_unused()
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_error(path, exc) from None
    if empty and require_rows:
        raise _no_rows(dataset, source)


def table_columns(path: TableSource | str | os.PathLike) -> list[str]:
    """The column names of the table at `path`, read from the file footers only."""
    dataset, _ = open_dataset(TableSource.of(path).path)
    return list(dataset.schema.names)


def row_counts(path: TableSource | str | os.PathLike, *, split: str | None = None) -> dict[str, int]:
    """Rows per attack (reading only the key columns), e.g. ``{"clean": 10000, "pgd": 10000}``."""
    source = TableSource.of(path, split=split)
    path = source.path
    dataset, _ = open_dataset(path)
    try:
        keys = dataset.to_table(columns=["attack"], filter=partition_filter(source)).column("attack")
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_error(path, exc) from None
    counts = pd.Series(keys.to_numpy(zero_copy_only=False)).value_counts()
    return {name: int(counts[name]) for name in distinct_values(counts.index.to_numpy(), first=CLEAN)}


def read_keys(path: TableSource | str | os.PathLike, *, split: str | None = None,
              attacks: str | Sequence[str] | None = None) -> RowKeys:
    """The keys and labels of the matching rows (reading only those columns, never the logits), in the
    order `read_table` and `iter_batches` give them. Raises `read_table`'s `TableError` when nothing matches."""
    source = TableSource.of(path, split=split, attacks=attacks)
    path = source.path
    dataset, file_schemas = open_dataset(path)
    metadata = dataset_metadata(file_schemas, path)
    check_schema(dataset.schema)
    try:
        batches = list(scan(dataset, ["split", "attack", "sample_id", "label"], source))
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_error(path, exc) from None
    keys = pa.Table.from_batches(batches) if batches else None
    if keys is None or keys.num_rows == 0:
        raise _no_rows(dataset, source)
    names = {}
    for c in ("split", "attack"):
        lookup: dict[str, int] = {}
        codes = string_codes(keys.column(c), lookup)
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
    label = single_array(keys.column("label"))
    labels = label.cast(pa.int64()).fill_null(-1).to_numpy() if not pa.types.is_null(label.type) else \
        np.full(keys.num_rows, -1, dtype=np.int64)
    return RowKeys(names["split"], names["attack"], single_array(keys.column("sample_id")).cast(pa.int64()).to_numpy(),
                   labels, metadata)


# Streamed commands read batches of about this many bytes of float32 tensors (logits, noise queries, features).
STREAM_BATCH_BYTES = 8 << 20
BATCH_ROWS_ENV = "LOGITGUARD_BATCH_ROWS"


def stream_batch_rows(path: TableSource | str | os.PathLike, columns: Sequence[str] = ()) -> int:
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
    path = TableSource.of(path).path
    dataset, file_schemas = open_dataset(path)
    num_classes = dataset_metadata(file_schemas, path).get("num_classes")
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


def noise_queries(path: TableSource | str | os.PathLike) -> tuple[int, int] | None:
    """(K, C) of the table's noise queries, or None when it has none; read from the schema (one batch of the
    column when its lists are not fixed-size)."""
    path = TableSource.of(path).path
    dataset, _ = open_dataset(path)
    if "noisy_logits" not in dataset.schema.names:
        return None
    kind = dataset.schema.field("noisy_logits").type
    if pa.types.is_fixed_size_list(kind) and pa.types.is_fixed_size_list(kind.value_type):
        return kind.list_size, kind.value_type.list_size
    for batch in iter_batches(path, columns=["noisy_logits"], batch_rows=1):
        return tuple(batch.noisy_logits.shape[1:])
    return None


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
