"""Scale-out on Ray: apply a saved defense to a logit table with Ray Data, on one machine or a cluster.

The local commands (`correct`, `detect`, `defend`, `guard apply`) work in one process. With ``--engine ray``
the same work is spread over Ray (docs/scale.md):

- `read_ray` reads a table as a Ray Dataset, one read task per Parquet row group, with the local reader's
  rules: hidden files are not part of the table, ``split``/``attack`` come from hive paths as strings,
  schemas are unified, page checksums are verified. The table metadata (Parquet schema metadata under
  ``logitguard``) is merged from the footers on the driver, as `read_table` does.
- `apply_ray` maps batches through a pool of actors. Each actor loads the saved defense once and applies the
  *same* functions as the local path to every batch, conformed by `logitguard.tables.conform`:
  `LogitCorrector.correct_table`, `Detector.score_samples`, `GatedDefense.defend_table`, `Guard.defend_table`.
- `write_ray` writes ``split=…/attack=…/<basename>-<task>-<n>.parquet`` with the local writer's encodings
  (zstd, byte-stream-split floats, page checksums) and the local output's metadata, into a staging directory
  that is committed in one step (`logitguard.files.staged_output`): the target holds the complete old output or
  the complete new one, never part of a run, and a second run to it refuses.

The reports the commands print (summary, flagged and rejected rates, evaluation, detection metrics) are
computed on the driver from a narrow per-row result (keys, label, the model's and the defended label, the
detector score) through the local report functions, so they equal the local reports.

Workers must see the table and the defense files under the same paths as the driver, and the output
directory must be on a file system every worker and the driver share (docs/scale.md).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasink

from .files import atomic_output, staged_output
from .errors import LogitguardError, TableError
from .evaluation.metrics import ABSTAIN
from .tables import (
    CLEAN,
    METADATA_KEY,
    OPTIONAL_COLUMNS,
    PARTITION_COLUMNS,
    REQUIRED_COLUMNS,
    LogitTable,
    check_columns,
    conform,
    dataset_metadata,
    distinct_values,
    open_dataset,
    parse_metadata,
    table_partitions,
    unreadable_error,
    wanted_columns,
    with_metadata,
    write_parquet,
)

__all__ = ["KINDS", "DefenseSpec", "apply_ray", "init_ray", "read_ray", "table_metadata", "write_ray"]

# What `apply_ray` applies: a corrector file (corrected logits and pred), a detector file (score and flagged
# per row, not a table), a detector with an optional corrector and a policy (pred and flagged), a guard file.
KINDS = ("corrector", "detector", "defense", "guard")
BATCH_ROWS = 16384  # rows per batch handed to an actor (the local streaming batch size)


# ---------------------------------------------------------------------------------------------
# Connecting


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to Ray unless this process already is.

    `address` (default: the ``RAY_ADDRESS`` environment variable) names a running cluster: ``ray://head:10001``
    (Ray Client), ``auto`` or ``head:6379`` (on a cluster node). Without one, a local Ray starts with
    `num_cpus` (default: every CPU) and no dashboard. `quiet`: no progress bars, worker output or INFO logs
    (tests, logs); usage statistics are off unless the environment says otherwise. When this process is
    already connected, nothing changes.
    """
    if ray.is_initialized():
        return  # connected by the caller (or an earlier call): their settings stand
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    level = logging.WARNING if quiet else logging.INFO
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet, logging_level=level)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet, logging_level=level)
    with warnings.catch_warnings():  # Ray Data's own defaults set fields it deprecates (2.60)
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ray.data.DataContext.get_current()
    context.enable_progress_bars = not quiet
    context.print_on_execution_start = not quiet
    logging.getLogger("ray.data").setLevel(level)


def _unwrap(exc: BaseException) -> BaseException:
    """The `LogitguardError` (or `OSError`) a Ray task raised, from under Ray's wrappers; else `exc`."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (LogitguardError, OSError)) and not isinstance(current, ray.exceptions.RayError):
            return current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return exc


class RayErrors:
    """Re-raise an error of ours raised inside Ray (a bad table, a schema the guard refuses) as itself, without
    Ray's wrapper and its remote traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        inner = _unwrap(exc)
        if inner is not exc:
            raise inner.with_traceback(None) from None
        return False


# ---------------------------------------------------------------------------------------------
# Reading


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
    `columns` (the required columns first) and carry the table metadata as Arrow schema metadata.
    """

    def __init__(self, path: str | os.PathLike, *, split: str | None = None,
                 columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS) -> None:
        super().__init__()
        path = Path(path)
        dataset, file_schemas = open_dataset(path)
        self.metadata = dataset_metadata(file_schemas, path)
        present = list(dataset.schema.names)
        check_columns(present)
        wanted = wanted_columns(path, present, columns)
        self.path = str(path)
        self.split = split
        self.batch_rows = batch_rows
        self.schema = pa.schema([dataset.schema.field(c) for c in (*REQUIRED_COLUMNS, *wanted)],
                                metadata={METADATA_KEY: json.dumps(self.metadata, sort_keys=True).encode()})
        self.units: list[_Unit] = []
        try:
            for fragment in dataset.get_fragments():
                keys = {k: str(v) for k, v in ds.get_partition_keys(fragment.partition_expression).items()}
                if split is not None and keys.get("split", split) != split:
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
        schema, split, rows = self.schema, self.split, self.batch_rows
        tasks = []
        for units in groups:
            meta = BlockMetadata(num_rows=None if split is not None else sum(u.rows for u in units),
                                 size_bytes=int(sum(u.size for u in units)), exec_stats=None,
                                 input_files=sorted({u.file for u in units}))
            tasks.append(ReadTask(lambda units=units: _read_units(units, schema, split, rows), meta, schema=schema,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def _read_units(units: list[_Unit], schema: pa.Schema, split: str | None, batch_rows: int) -> Iterator[pa.Table]:
    """The rows of `units` as tables of `schema` (partition values from the path, missing columns null)."""
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
                if split is not None and "split" not in keys:
                    table = table.filter(pc.equal(table.column("split"), split))
                if table.num_rows:
                    yield table
        except (pa.ArrowException, OSError) as exc:
            raise unreadable_error(Path(unit.file), exc) from None


def read_ray(path: str | os.PathLike, *, split: str | None = None, columns: Sequence[str] | None = None,
             batch_rows: int = BATCH_ROWS) -> ray.data.Dataset:
    """The logit table at `path` as a Ray Dataset (`LogitTableDatasource`); filters and `columns` as in
    `read_table`. Its blocks carry the table metadata, so `apply_ray` needs no `metadata` argument.

    (``ray.data.read_parquet(path)`` also works with `apply_ray`; it drops the metadata, so pass
    ``metadata=table_metadata(path)``, and it does not verify page checksums.)
    """
    init_ray()
    return ray.data.read_datasource(LogitTableDatasource(path, split=split, columns=columns, batch_rows=batch_rows))


# ---------------------------------------------------------------------------------------------
# Applying


@dataclass(frozen=True)
class DefenseSpec:
    """What `apply_ray` applies: `kind` (one of `KINDS`) and the saved file(s) it loads.

    ``corrector``: `path` is a corrector file (train-corrector); ``detector``: a detector file (fit-detector);
    ``defense``: `path` is a detector file, `corrector` an optional corrector / SVM / odds file, `on_flag` the
    policy (`GatedDefense`); ``guard``: `path` is a guard file (guard fit).
    """

    kind: str
    path: str
    corrector: str | None = None
    on_flag: str = "correct"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LogitguardError(f"unknown kind {self.kind!r}; choose from {', '.join(KINDS)}")

    def load(self, device: str = "cpu") -> Any:
        """The loaded defense (once per actor)."""
        if self.kind == "corrector":
            from .defenses.corrector import LogitCorrector

            return LogitCorrector.load(self.path, device=device)
        if self.kind == "guard":
            from .defenses.guard import Guard

            return Guard.load(self.path)
        from .defenses.detectors import load_detector

        if self.kind == "detector":
            return load_detector(self.path)
        from .defenses.gated import GatedDefense, load_corrector

        corrector = None if self.corrector is None else load_corrector(self.corrector)
        return GatedDefense(load_detector(self.path), corrector, on_flag=self.on_flag)

    def columns(self, available: Sequence[str]) -> list[str]:
        """The optional columns the local command reads for this kind."""
        if self.kind == "corrector":
            return [c for c in ("linf", "l2") if c in available]
        if self.kind == "detector":  # a detector with an input column ("features", "insen") reads it too
            return [c for c in ("noisy_logits", "features", "insen") if c in available]
        return [c for c in OPTIONAL_COLUMNS if c in available]

    def transform(self, loaded: Any, table: LogitTable) -> LogitTable | pa.Table:
        """The local path's function on one conformed batch."""
        if self.kind == "corrector":
            return loaded.correct_table(table)
        if self.kind == "detector":
            score = loaded.score_table(table)
            label = table.arrow.column("label")
            return pa.table({"split": table.arrow.column("split"), "attack": table.arrow.column("attack"),
                             "sample_id": table.arrow.column("sample_id"), "label": label,
                             "model_label": pa.array(table.logits.argmax(axis=1).astype(np.int64)),
                             "score": pa.array(score, pa.float64()),
                             "flagged": pa.array(score > loaded.threshold_)})  # Detector.predict
        return loaded.defend_table(table)


class _ApplyActor:
    """One Ray Data actor: loads the defense once, then transforms batch after batch."""

    def __init__(self, spec: DefenseSpec, metadata: dict[str, Any] | None, split: str | None, device: str,
                 threads: int) -> None:
        self.spec, self.metadata, self.split = spec, metadata, split
        self.loaded = spec.load(device)
        if threads > 0 and "torch" in sys.modules:  # a torch corrector: one thread per CPU Ray gave the actor
            sys.modules["torch"].set_num_threads(threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        metadata = self.metadata
        if metadata is None:
            metadata = parse_metadata((batch.schema.metadata or {}).get(METADATA_KEY), "batch")
        batch = _plain_tensors(batch)
        if self.split is not None:
            batch = batch.filter(pc.equal(batch.column("split"), self.split))
        if batch.num_rows == 0:
            return pa.table({})
        out = self.spec.transform(self.loaded, conform(batch.replace_schema_metadata(None), metadata=metadata))
        return with_metadata(out.arrow, out.metadata) if isinstance(out, LogitTable) else out


def _plain_tensors(batch: pa.Table) -> pa.Table:
    """Ray's tensor extension columns (from a user's dataset built with NumPy batches) as nested fixed-size
    lists, the form `conform` reads."""
    for i, field in enumerate(batch.schema):
        if isinstance(field.type, pa.ExtensionType):
            values = np.asarray(batch.column(i).to_numpy(), dtype=np.float32)
            if values.dtype == object:
                values = np.stack(list(values))
            array: pa.Array = pa.array(np.ascontiguousarray(values).ravel())
            for size in reversed(values.shape[1:]):
                array = pa.FixedSizeListArray.from_arrays(array, size)
            batch = batch.set_column(i, field.name, array)
    return batch


def apply_ray(
    dataset: ray.data.Dataset,
    defense: str | os.PathLike | DefenseSpec,
    *,
    kind: str = "guard",
    corrector: str | os.PathLike | None = None,
    on_flag: str = "correct",
    metadata: Mapping[str, Any] | str | os.PathLike | None = None,
    split: str | None = None,
    batch_rows: int = BATCH_ROWS,
    workers: int | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> ray.data.Dataset:
    """Apply a saved defense to every row of a Ray Dataset of logit-table rows.

    Parameters
    ----------
    dataset : rows with the table's columns (`read_ray`, or ``ray.data.read_parquet`` of a table).
    defense : the saved file (see `DefenseSpec`), or a `DefenseSpec`.
    kind : ``corrector``, ``detector``, ``defense`` or ``guard``.
    corrector, on_flag : for ``defense``: the corrector file and the policy.
    metadata : the input table's metadata, or the path of the table to read it from; None: taken from the
        blocks (`read_ray` puts it there; ``read_parquet`` does not: then class names default to 0..C-1).
    split : keep only rows of this split.
    workers : at most this many actors (default: as many as Ray can place); each takes `num_cpus` CPUs and
        `num_gpus` GPUs (a corrector then runs on ``cuda``).

    Returns
    -------
    A Dataset of the local function's output rows: for ``corrector``, ``defense`` and ``guard`` logit-table
    rows (with the output metadata on each block; `write_ray` writes them), for ``detector`` one row per input
    row with ``split``, ``attack``, ``sample_id``, ``label``, ``model_label``, ``score`` and ``flagged``.
    """
    spec = defense if isinstance(defense, DefenseSpec) else DefenseSpec(
        kind, str(defense), None if corrector is None else str(corrector), on_flag)
    if metadata is not None and not isinstance(metadata, Mapping):
        metadata = table_metadata(metadata)
    if not isinstance(defense, DefenseSpec):
        spec.load()  # a missing or wrong file fails here, before any actor starts
    init_ray()
    device = "cuda" if num_gpus else "cpu"
    compute = ray.data.ActorPoolStrategy(min_size=1, max_size=workers)
    return dataset.map_batches(
        _ApplyActor, fn_constructor_args=(spec, None if metadata is None else dict(metadata), split, device,
                                          int(num_cpus) if not num_gpus else 0),
        batch_format="pyarrow", batch_size=batch_rows, compute=compute, num_cpus=num_cpus, num_gpus=num_gpus,
        zero_copy_batch=True)


# ---------------------------------------------------------------------------------------------
# Writing


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
            narrow.append(_narrow(table))
        return {"files": files, "rows": narrow}

    def on_write_complete(self, write_result: Any) -> None:
        self.returns = list(write_result.write_returns)


def _narrow(table: LogitTable) -> pa.Table:
    """Per row: keys, label, the argmax of the logits, and pred / flagged / linf / l2 when present."""
    arrow = table.arrow
    columns = {c: arrow.column(c) for c in ("split", "attack", "sample_id", "label")}
    columns["model_label"] = pa.array(table.logits.argmax(axis=1).astype(np.int64))
    for name in ("pred", "flagged", "linf", "l2"):
        if name in arrow.column_names:
            columns[name] = arrow.column(name)
    return pa.table(columns)


def _write(dataset: ray.data.Dataset, out: str | os.PathLike, *, metadata: Mapping[str, Any] | None,
           basename: str, overwrite: bool) -> tuple[list[Path], pa.Table]:
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
        narrow = pa.concat_tables([t for result in sink.returns for t in result["rows"]], promote_options="default")
        _check_unique(narrow)  # across batches, as read_table checks the whole table: before the commit
    return [out / rel for rel in sorted(files)], narrow


def _check_unique(narrow: pa.Table) -> None:
    """A (split, attack, sample_id) in two rows of the table (each batch was checked on its own)."""
    keys = narrow.select(["split", "attack", "sample_id"]).to_pandas()
    duplicated = keys.duplicated().to_numpy()
    if duplicated.any():
        row = keys.iloc[int(np.flatnonzero(duplicated)[0])]
        raise TableError(f"duplicate row for (split={row['split']!r}, attack={row['attack']!r}, "
                         f"sample_id={int(row['sample_id'])})")


def write_ray(dataset: ray.data.Dataset, out: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None,
              basename: str = "part", overwrite: bool = False) -> list[Path]:
    """Write logit-table rows (from `apply_ray`) as a partitioned table directory `out`, atomically as a whole.

    Files are ``out/split=…/attack=…/<basename>-<task>-<n>.parquet``, written by the Ray workers into a
    staging directory beside `out` (on a file system they share with the driver) with the local writer's
    encodings and `metadata` (default: the metadata `apply_ray` put on the blocks); the staging directory is
    put in place in one step. `overwrite` replaces an existing output as a whole. Returns the files written.
    """
    return _write(dataset, out, metadata=metadata, basename=basename, overwrite=overwrite)[0]


# ---------------------------------------------------------------------------------------------
# Reports: the local report functions on a stand-in table of the narrow result


def _agreement_table(rows: pd.DataFrame, metadata: dict[str, Any], *, pred: bool = False) -> LogitTable:
    """A two-class stand-in for the rows: class 0 is "the row's label". Logits are [1, 0] where the model's
    argmax equals the label, else [0, 1]; ``pred`` (with `pred`) is 0 where the defended label equals the label,
    null where the row was rejected, else 1. Every report function only compares labels with the ground truth
    and with `ABSTAIN`, so on this table they give the numbers they give on the real one."""
    labelled = rows["label"].to_numpy() >= 0
    right = (rows["model_label"].to_numpy() == rows["label"].to_numpy()) & labelled
    logits = np.stack([right, ~right], axis=1).astype(np.float32)
    optional: dict[str, Any] = {c: rows[c].to_numpy() for c in ("linf", "l2") if c in rows}
    if pred:
        defended = rows["pred"].to_numpy()
        optional["pred"] = np.where(defended == rows["label"].to_numpy(), 0, 1)
    meta = {k: v for k, v in metadata.items() if k not in ("num_classes", "class_names")}
    table = LogitTable.from_arrays(logits=logits, sample_id=rows["sample_id"].to_numpy(),
                                   split=rows["split"].to_numpy(), attack=rows["attack"].to_numpy(),
                                   label=np.where(labelled, 0, -1), metadata=meta, **optional)
    if pred:
        rejected = rows["pred"].to_numpy() == ABSTAIN
        arrow = table.arrow.set_column(table.arrow.column_names.index("pred"), "pred",
                                       pa.array(optional["pred"], pa.int64(), mask=rejected))
        table = LogitTable(arrow, table.metadata)
    return table


def _frame(narrow: pa.Table) -> pd.DataFrame:
    frame = narrow.to_pandas()
    for name in ("label", "pred"):
        if name in frame:
            frame[name] = frame[name].fillna(-1).astype(np.int64)
    return frame


class _PredColumn:
    """A defense whose label for a row is the stored ``pred`` column (`ABSTAIN` where null)."""

    def predict_table(self, table: LogitTable) -> np.ndarray:
        return table.column("pred")


class _ScoreLookup:
    """A detector whose score for a row is the score the actors computed for that (split, attack, sample_id)."""

    def __init__(self, rows: pd.DataFrame, threshold: float) -> None:
        self.scores = rows.set_index(["split", "attack", "sample_id"])["score"]
        self.threshold_ = threshold

    def score_table(self, table: LogitTable) -> np.ndarray:
        keys = pd.MultiIndex.from_arrays([table.split, table.attack, table.sample_id])
        return self.scores.reindex(keys).to_numpy(dtype=np.float64)


def _summary(rows: pd.DataFrame, metadata: dict[str, Any]) -> dict[str, Any]:
    """`summarize` of an output table without noise queries (the corrected table), from its narrow rows."""
    from .report.summary import summarize

    summary = summarize(_agreement_table(rows, metadata))
    summary.update(num_classes=metadata["num_classes"], class_names=list(metadata["class_names"]), noise_queries=None)
    return summary


def _check_labels(rows: pd.DataFrame) -> None:
    """What `pair` refuses: a sample whose rows (clean and attacked) disagree on its label."""
    counts = rows.groupby(["split", "sample_id"], sort=False)["label"].nunique()
    if (counts > 1).any():
        split, sample_id = counts.index[np.flatnonzero(counts.to_numpy() > 1)[0]]
        found = rows[(rows["split"] == split) & (rows["sample_id"] == sample_id)]
        labels = ", ".join(f"{a} {l}" for a, l in zip(found["attack"], found["label"]))
        raise TableError(f"sample_id {sample_id} (split {split!r}) has different labels in its rows ({labels})")


# ---------------------------------------------------------------------------------------------
# Command bodies (`logitguard … --engine ray`)


def _prepare(table: str, spec: DefenseSpec, split: str | None,
             workers: int | None) -> tuple[ray.data.Dataset, Any, dict[str, Any], dict[str, Any] | None]:
    """The command's Ray pipeline, the loaded defense, the input metadata and the output metadata.

    The defense first runs here on the first row the command would read (locally, without Ray): a wrong file
    or a schema the defense refuses fails before Ray starts, and the output metadata is what the local
    command writes."""
    from .tables import read_table, table_columns

    columns = spec.columns(table_columns(table))
    source = LogitTableDatasource(table, split=split, columns=columns)
    # The first row through the Ray read path itself (no scanner read-ahead: one row group at most in memory).
    head = next(_read_units(source.units, source.schema, split, 1024), None)
    if head is None:
        read_table(table, split=split, columns=[])  # raises the local command's error (no rows match …)
        raise TableError(f"{table}: no rows")
    first = conform(head.slice(0, 1).replace_schema_metadata(None), metadata=source.metadata)
    loaded = spec.load()
    probe = spec.transform(loaded, first)
    init_ray(quiet=not sys.stderr.isatty())
    # An error in an actor (a batch that breaks the contract) reaches the command as itself, not wrapped in a
    # UserCodeException that loses it on its way back: the command prints it as `Error: …`.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    result = apply_ray(ray.data.read_datasource(source), spec, metadata=first.metadata, workers=workers)
    return result, loaded, first.metadata, probe.metadata if isinstance(probe, LogitTable) else None


def cli_correct(table: str, corrector: str, out: str, *, force: bool, as_json: bool, workers: int | None) -> None:
    """`logitguard correct --engine ray`."""
    import click

    from .cli.options import echo_json
    from .report.summary import format_summary

    spec = DefenseSpec("corrector", corrector)
    result, _, _, metadata = _prepare(table, spec, None, workers)
    written, narrow = _write(result, out, metadata=metadata, basename="corrected", overwrite=force)
    summary = _summary(_frame(narrow), metadata)
    if as_json:
        echo_json({"written": [str(p) for p in written], "summary": summary})
    else:
        click.echo(format_summary(summary))
        click.echo(f"\nwrote {len(written)} file(s) under {out}")


def cli_detect(table: str, detector: str, split: str, *, as_json: bool, workers: int | None) -> None:
    """`logitguard detect --engine ray`."""
    import click

    from .cli.options import echo_json
    from .evaluation.evaluate import detection_table
    from .report.evaluation import format_detection

    spec = DefenseSpec("detector", detector)
    result, loaded, metadata, _ = _prepare(table, spec, split, workers)
    with RayErrors():
        parts = [ray.get(ref) for ref in result.to_arrow_refs()]
    narrow = pa.concat_tables([p for p in parts if p.num_rows])
    _check_unique(narrow)
    frame = _frame(narrow)
    attacks = distinct_values(frame["attack"].to_numpy(), first=CLEAN)
    rates = {a: float(frame["flagged"][frame["attack"] == a].mean()) for a in attacks}
    metrics = None
    if (frame["label"] >= 0).all() and CLEAN in attacks and len(attacks) > 1:
        _check_labels(frame)
        scores = {loaded.kind: _ScoreLookup(frame, loaded.threshold_)}
        metrics = detection_table(_agreement_table(frame, metadata), scores, split=None)
    if as_json:
        from .evaluation.threat import to_records

        echo_json({"flagged_rate": rates, "metrics": None if metrics is None else to_records(metrics)})
        return
    click.echo("flagged: " + ", ".join(f"{a} {100 * r:.1f}%" for a, r in rates.items()))
    if metrics is not None:
        click.echo(format_detection(metrics))


def cli_defend(table: str, spec: DefenseSpec, out: str, *, split: str | None, force: bool, as_json: bool,
               workers: int | None) -> None:
    """`logitguard defend --engine ray` and `logitguard guard apply --engine ray` (`spec.kind` defense or guard)."""
    import click

    from .cli.options import echo_json
    from .evaluation.evaluate import evaluate
    from .report.evaluation import format_evaluation

    result, loaded, _, metadata = _prepare(table, spec, split, workers)
    written, narrow = _write(result, out, metadata=metadata, basename="defended", overwrite=force)
    frame = _frame(narrow)
    on_flag = (loaded.defense if spec.kind == "guard" else loaded).on_flag
    attacks = distinct_values(frame["attack"].to_numpy(), first=CLEAN)
    results = None
    if (frame["label"] >= 0).all() and CLEAN in attacks and len(attacks) > 1:
        splits = distinct_values(frame["split"].to_numpy())
        test = split or ("test" if "test" in splits else None)
        _check_labels(frame if test is None else frame[frame["split"] == test])
        results = evaluate(_agreement_table(frame, metadata, pred=True), {"gated": _PredColumn()}, split=test)
    flagged = {a: float(frame["flagged"][frame["attack"] == a].mean()) for a in attacks}
    rejected = {a: float((frame["pred"][frame["attack"] == a] == ABSTAIN).mean()) for a in attacks}
    if as_json:
        echo_json({"written": [str(p) for p in written], "on_flag": on_flag, "flagged_rate": flagged,
                   "rejected_rate": rejected,
                   "evaluation": None if results is None else results.to_dict(orient="records")})
        return
    click.echo("flagged: " + ", ".join(f"{a} {100 * r:.1f}%" for a, r in flagged.items()))
    if on_flag != "correct":
        click.echo("rejected: " + ", ".join(f"{a} {100 * r:.1f}%" for a, r in rejected.items()))
    if results is not None:
        click.echo(format_evaluation(results))
    click.echo(f"wrote {len(written)} file(s) under {out}")
