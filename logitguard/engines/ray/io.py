"""Reading and writing logit tables on Ray Data: a datasource with the local reader's rules and a datasink
with the local writer's encodings, committed in one step.

- `read_ray` reads a table as a Ray Dataset, one read task per Parquet row group: hidden files are not part
  of the table, ``split``/``attack`` come from hive paths as strings, schemas are unified, column types are
  checked from the footers (`check_schema`), page checksums are verified. The table metadata (Parquet schema
  metadata under ``logitguard``) is merged from the footers on the driver, as `read_table` does.
- `write_ray` writes ``split=…/attack=…/<basename>-<task>-<n>.parquet`` with the local writer's encodings into
  a staging directory committed in one step (`logitguard.files.staged_output`): the target holds the complete
  old output or the complete new one, never part of a run. The per-row decisions that `apply_ray` put beside
  the rows (`actors.DECISION`) are not written: they come back to the driver for the report.

Workers must see the table under the same path as the driver, and the output directory must be on a file
system every worker and the driver share (docs/scale.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasink

from ...errors import TableError
from ...files import atomic_output, staged_output
from ...tables import (METADATA_KEY, PARTITION_COLUMNS, REQUIRED_COLUMNS, TableSource, conform, dataset_metadata,
                       open_dataset, parse_metadata, table_partitions, unreadable_error, wanted_columns, with_metadata,
                       write_parquet)
from ...tables.validation import check_schema
from .actors import BATCH_ROWS, rows_of, split_decisions
from .connection import RayErrors, init_ray

__all__ = ["LogitTableDatasource", "read_ray", "table_metadata", "write_ray"]


def table_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the table at `path`, merged from its files' footers as `read_table` does."""
    path = Path(path)
    _, file_schemas = open_dataset(path)
    return dataset_metadata(file_schemas, path)


@dataclass(frozen=True)
class _Unit:
    """One row group of one file, and the partition values its path gives (hive ``split=…/attack=…``)."""

    file: str
    row_group: int
    rows: int
    size: int
    keys: tuple[tuple[str, str], ...]


class LogitTableDatasource(Datasource):
    """A logit table (a Parquet file or a hive-partitioned directory) as a Ray Data source.

    One read task per row group (groups merged down to the requested parallelism). Blocks hold
    `columns` (the required columns first) and carry the table metadata as Arrow schema metadata. `path` is a
    `TableSource` (only its split's and attacks' rows are read) or a path (every row).
    """

    def __init__(self, path: TableSource | str | os.PathLike, *,
                 columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS) -> None:
        super().__init__()
        self.source = source = TableSource.of(path)
        path = source.path
        dataset, file_schemas = open_dataset(path)
        self.metadata = dataset_metadata(file_schemas, path)
        present = list(dataset.schema.names)
        check_schema(dataset.schema)
        wanted = wanted_columns(path, present, columns)
        self.path = str(path)
        self.batch_rows = batch_rows
        self.schema = pa.schema([dataset.schema.field(c) for c in (*REQUIRED_COLUMNS, *wanted)],
                                metadata={METADATA_KEY: json.dumps(self.metadata, sort_keys=True).encode()})
        self.units: list[_Unit] = []
        try:
            for fragment in dataset.get_fragments():
                keys = {k: str(v) for k, v in ds.get_partition_keys(fragment.partition_expression).items()}
                if not _may_match(source, keys):
                    continue
                footer = fragment.metadata
                for group in range(footer.num_row_groups):
                    info = footer.row_group(group)
                    if info.num_rows:
                        self.units.append(_Unit(fragment.path, group, info.num_rows, info.total_byte_size,
                                                tuple(sorted(keys.items()))))
        except (pa.ArrowException, OSError) as exc:
            raise unreadable_error(path, exc) from None

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(u.size for u in self.units)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        count = max(1, min(int(parallelism) if parallelism and parallelism > 0 else len(self.units),
                           len(self.units)))
        groups = [self.units[i::count] for i in range(count)] if self.units else []
        schema, source, rows = self.schema, self.source, self.batch_rows
        selected = source.split is not None or source.attacks is not None
        tasks = []
        for units in groups:
            meta = BlockMetadata(num_rows=None if selected else sum(u.rows for u in units),
                                 size_bytes=int(sum(u.size for u in units)), exec_stats=None,
                                 input_files=sorted({u.file for u in units}))
            tasks.append(ReadTask(lambda units=units: read_units(units, schema, source, rows), meta, schema=schema,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def _may_match(source: TableSource, keys: Mapping[str, str]) -> bool:
    """Whether a file with hive partition values `keys` may hold rows of `source` (False only when a value
    the path gives is not selected)."""
    if source.split is not None and keys.get("split", source.split) != source.split:
        return False
    return source.attacks is None or "attack" not in keys or keys["attack"] in source.attacks


def read_units(units: list[_Unit], schema: pa.Schema, source: TableSource, batch_rows: int) -> Iterator[pa.Table]:
    """The rows of `units` that `source` selects, as tables of `schema` (partition values from the path,
    missing columns null)."""
    for unit in units:
        keys = dict(unit.keys)
        try:
            parquet = pq.ParquetFile(unit.file, page_checksum_verification=True)
            names = set(parquet.schema_arrow.names)
            columns = [f.name for f in schema if f.name in names]
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[unit.row_group], columns=columns):
                n = batch.num_rows
                arrays = []
                for field in schema:
                    if field.name in names:
                        column = batch.column(field.name)
                        arrays.append(column if column.type == field.type else column.cast(field.type))
                    elif field.name in keys:
                        arrays.append(pa.array([keys[field.name]] * n, field.type))
                    else:
                        arrays.append(pa.nulls(n, field.type))
                table = pa.Table.from_arrays(arrays, schema=schema)
                if source.split is not None and "split" not in keys:
                    table = table.filter(pc.equal(table.column("split"), source.split))
                if source.attacks is not None and "attack" not in keys:
                    table = table.filter(pc.is_in(table.column("attack"),
                                                  value_set=pa.array(list(source.attacks), pa.string())))
                if table.num_rows:
                    yield table
        except (pa.ArrowException, OSError) as exc:
            raise unreadable_error(Path(unit.file), exc) from None


def read_ray(path: TableSource | str | os.PathLike, *, columns: Sequence[str] | None = None,
             batch_rows: int = BATCH_ROWS) -> ray.data.Dataset:
    """The logit table at `path` (a `TableSource`, e.g. ``TableSource(path, split="test")``, or a path: every
    row) as a Ray Dataset (`LogitTableDatasource`); `columns` as in `read_table`. Its blocks carry the table metadata, so `apply_ray` needs no `metadata` argument.

    (``ray.data.read_parquet(path)`` also works with `apply_ray`; it drops the metadata, so pass
    ``metadata=table_metadata(path)``, and it does not verify page checksums.)
    """
    init_ray()
    return ray.data.read_datasource(LogitTableDatasource(path, columns=columns, batch_rows=batch_rows))
class _TableSink(Datasink):
    """Writes each block's partitions as Parquet files under `stage`, as `write_table` writes them, and returns
    the files and the narrow per-row result."""

    def __init__(self, stage: str, basename: str, metadata: dict[str, Any] | None) -> None:
        self.stage, self.basename, self.metadata = stage, basename, metadata
        self.returns: list[dict[str, Any]] = []

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        files, narrow, count = [], [], 0
        for block in blocks:
            if not block.num_rows:
                continue
            block, decisions = split_decisions(block)
            metadata = self.metadata
            if metadata is None:
                raw = (block.schema.metadata or {}).get(METADATA_KEY)
                if raw is None:
                    raise TableError("rows without table metadata: pass metadata= to write_ray")
                metadata = parse_metadata(raw, "block")
            table = conform(block.replace_schema_metadata(None), metadata=metadata)
            for values, part in table_partitions(table, list(PARTITION_COLUMNS)):
                rel = str(Path(*(f"{c}={v}" for c, v in zip(PARTITION_COLUMNS, values)),
                               f"{self.basename}-{ctx.task_idx:05d}-{count:04d}.parquet"))
                count += 1
                target = Path(self.stage) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_output(target, overwrite=True, error=TableError) as tmp:
                    write_parquet(with_metadata(part.drop_columns(list(PARTITION_COLUMNS)), table.metadata), tmp)
                files.append((rel, part.num_rows))
            narrow.append(decisions)
        return {"files": files, "rows": narrow}

    def on_write_complete(self, write_result: Any) -> None:
        self.returns = list(write_result.write_returns)


def write_rows(dataset: ray.data.Dataset, out: str | os.PathLike, *, metadata: Mapping[str, Any] | None,
               basename: str, overwrite: bool) -> tuple[list[Path], list[pa.Table]]:
    """`write_ray`, and the keys and per-row decisions of every written block (`actors.split_decisions`) for
    the driver's report. Returns (files written, one keys-and-decisions table per block)."""
    out = Path(out)
    if out.suffix == ".parquet":
        raise TableError(f"--engine ray writes a partitioned directory, not one file: give --out a directory "
                         f"(or use --engine local for {out.name})")
    with staged_output(out, overwrite=overwrite, replace=True, error=TableError) as stage:
        sink = _TableSink(str(stage), basename, None if metadata is None else dict(metadata))
        with RayErrors():
            dataset.write_datasink(sink)
        files = [rel for result in sink.returns for rel, _ in result["files"]]
        if not files:
            raise TableError("nothing to write: no rows")
        missing = [rel for rel in files if not (stage / rel).is_file()]
        if missing:
            raise TableError(f"Ray workers wrote {len(missing)} file(s) this machine cannot see (e.g. {missing[0]}): "
                             f"put --out on a file system shared by the driver and every worker (docs/scale.md)")
        decisions = [t for result in sink.returns for t in result["rows"]]
        rows_of(decisions, {})  # a key in two batches: refused as read_table refuses it, before the commit
    return [out / rel for rel in sorted(files)], decisions


def write_ray(dataset: ray.data.Dataset, out: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None,
              basename: str = "part", overwrite: bool = False) -> list[Path]:
    """Write logit-table rows (from `apply_ray`) as a partitioned table directory `out`, atomically as a whole.

    Files are ``out/split=…/attack=…/<basename>-<task>-<n>.parquet``, written by the Ray workers into a
    staging directory beside `out` (on a file system they share with the driver) with the local writer's
    encodings and `metadata` (default: the metadata `apply_ray` put on the blocks); the staging directory is
    put in place in one step. `overwrite` replaces an existing output as a whole. Returns the files written.
    """
    return write_rows(dataset, out, metadata=metadata, basename=basename, overwrite=overwrite)[0]
