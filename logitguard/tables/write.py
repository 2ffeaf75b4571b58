"""Writing tables: one file or a partitioned directory (`write_table`), or batch by batch into a staged
output (`write_batches`); checksummed pages, byte-stream-split floats, deterministic bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..files import atomic_output, staged_output
from ..errors import TableError
from .arrays import distinct_values
from .schema import METADATA_KEY, PARTITION_COLUMNS
from .table import LogitTable


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
    raises `TableError` (see `logitguard.files.OutputLock`).

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
