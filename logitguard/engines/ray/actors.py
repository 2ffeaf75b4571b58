"""Applying a saved defense on Ray Data: a pool of actors, each loading the defense once and moving batch after
batch through the one apply path (`logitguard.defenses.apply.apply_batch`), as the streamed engine does.

Each output block holds the rows the command writes (corrected or defended; none for a detector) and, beside
them, the `Decision` of each row under ``decision.*`` columns (`DECISION`): the driver's report reads those
(`rows_of`, then `logitguard.engines.report`), and `write_ray` leaves them out of the files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from ...defenses.apply import Applied, apply_batch, output_columns
from ...errors import LogitguardError
from ...tables import METADATA_KEY, RowCollector, RowKeys, conform, parse_metadata, with_metadata
from .connection import init_ray

__all__ = ["BATCH_ROWS", "DECISION", "KINDS", "DefenseSpec", "apply_ray", "rows_of", "split_decisions"]

# What `apply_ray` applies: a corrector file (corrected logits and pred), a detector file (score and flagged
# per row, not a table), a detector with an optional corrector and a policy (pred and flagged), a guard file.
KINDS = ("corrector", "detector", "defense", "guard")
BATCH_ROWS = 16384  # rows per batch handed to an actor (the local streaming batch size)
DECISION = "decision."  # prefix of the per-row decision columns beside an output block's rows
KEYS = ("split", "attack", "sample_id", "label")
FIELDS = ("model_label", "flagged", "score", "label")  # the Decision's fields
NORMS = ("linf", "l2")


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
            from ...defenses.corrector import LogitCorrector

            return LogitCorrector.load(self.path, device=device)
        if self.kind == "guard":
            from ...defenses.guard import Guard

            return Guard.load(self.path)
        from ...defenses.detectors import load_detector

        if self.kind == "detector":
            return load_detector(self.path)
        from ...defenses.gated import GatedDefense, load_corrector

        corrector = None if self.corrector is None else load_corrector(self.corrector)
        return GatedDefense(load_detector(self.path), corrector, on_flag=self.on_flag)

    def columns(self, available: Sequence[str], loaded: Any = None) -> list[str]:
        """The optional columns the local command reads for this defense (`output_columns`)."""
        return output_columns(self.load() if loaded is None else loaded, list(available))


def encode(applied: Applied) -> pa.Table:
    """One output block: the output rows (with their metadata) and ``decision.*`` columns; for a detector,
    the keys and the decision fields unprefixed (``split``, ``attack``, ``sample_id``, ``label``,
    ``model_label``, ``flagged``, ``score``; the rows `Detector.flag` gives) and ``decision.label``."""
    keys, decision = applied.keys, applied.decision
    fields = {"model_label": pa.array(decision.model_label, pa.int64()), "flagged": pa.array(decision.flagged),
              "score": pa.array(decision.score, pa.float64()),
              "label": pa.array(decision.label, pa.int64())}
    if applied.output is None:
        labels = pa.array(keys.labels, pa.int64(), mask=keys.labels < 0)
        columns = {"split": pa.array(keys.split, pa.string()), "attack": pa.array(keys.attack, pa.string()),
                   "sample_id": pa.array(keys.sample_id, pa.int64()), "label": labels}
        columns |= {f: fields[f] for f in ("model_label", "flagged", "score")}
        columns[DECISION + "label"] = fields["label"]
        columns |= {n: pa.array(keys.values[n], pa.float32()) for n in NORMS if n in keys.values}
        return pa.table(columns)
    out = with_metadata(applied.output.arrow, applied.output.metadata)
    for name, values in fields.items():
        out = out.append_column(DECISION + name, values)
    return out


def split_decisions(block: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(the block's rows without ``decision.*`` columns, its keys, norms and ``decision.*`` columns)."""
    decided = [c for c in block.column_names if c.startswith(DECISION)]
    narrow = [c for c in (*KEYS, *NORMS) if c in block.column_names]
    return block.drop_columns(decided), block.select([*narrow, *decided])


def rows_of(parts: Sequence[pa.Table], metadata: Mapping[str, Any]) -> RowKeys:
    """The keys and decisions of `parts` (from `split_decisions`, or a detector's rows) as one `RowKeys` whose
    values are the decision fields present (and linf / l2); a key in two rows is a `TableError`."""
    collector = RowCollector()
    for part in parts:
        if not part.num_rows:
            continue
        label = part.column("label")
        labels = np.full(part.num_rows, -1, np.int64) if pa.types.is_null(label.type) else \
            label.cast(pa.int64()).fill_null(-1).to_numpy()
        values = {name: part.column(name).to_numpy() for name in (*FIELDS, *NORMS)
                  if name != "label" and name in part.column_names}
        values |= {name: part.column(DECISION + name).to_numpy() for name in FIELDS
                   if DECISION + name in part.column_names}
        keys = RowKeys(*(part.column(c).to_numpy(zero_copy_only=False).astype(object) for c in ("split", "attack")),
                       part.column("sample_id").cast(pa.int64()).to_numpy(), labels, dict(metadata), values)
        collector.add(keys)
    return collector.finish()


class _ApplyActor:
    """One Ray Data actor: loads the defense once, then moves batch after batch through `apply_batch`."""

    def __init__(self, spec: DefenseSpec, metadata: dict[str, Any] | None, shapes: dict[str, tuple] | None,
                 device: str, threads: int) -> None:
        self.spec, self.metadata, self.shapes = spec, metadata, shapes
        self.loaded = spec.load(device)
        if threads > 0 and "torch" in sys.modules:  # a torch corrector: one thread per CPU Ray gave the actor
            sys.modules["torch"].set_num_threads(threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        metadata = self.metadata
        if metadata is None:
            metadata = parse_metadata((batch.schema.metadata or {}).get(METADATA_KEY), "batch")
        batch = _plain_tensors(batch)
        if batch.num_rows == 0:
            return pa.table({})
        table = conform(batch.replace_schema_metadata(None), metadata=metadata, shapes=self.shapes)
        return encode(apply_batch(self.loaded, table))


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
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    batch_rows: int = BATCH_ROWS,
    workers: int | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> ray.data.Dataset:
    """Apply a saved defense to every row of a Ray Dataset of logit-table rows.

    Parameters
    ----------
    dataset : rows with the table's columns (`read_ray`, or ``ray.data.read_parquet`` of a table); every row is
        decided: select them when the dataset is read (``read_ray(TableSource(path, split="test"))``).
    defense : the saved file (see `DefenseSpec`), or a `DefenseSpec`.
    kind : ``corrector``, ``detector``, ``defense`` or ``guard``.
    corrector, on_flag : for ``defense``: the corrector file and the policy.
    metadata : the input table's metadata, or the path of the table to read it from; None: taken from the
        blocks (`read_ray` puts it there; ``read_parquet`` does not: then class names default to 0..C-1).
    shapes : per-row shapes every batch must have (`logitguard.tables.validation.row_shapes` of a first batch).
    workers : at most this many actors (default: as many as Ray can place); each takes `num_cpus` CPUs and
        `num_gpus` GPUs (a corrector then runs on ``cuda``).

    Returns
    -------
    A Dataset of output blocks (`encode`): for ``corrector``, ``defense`` and ``guard`` logit-table rows with
    the output metadata (`write_ray` writes them) and ``decision.*`` columns; for ``detector`` one row per
    input row with ``split``, ``attack``, ``sample_id``, ``label``, ``model_label``, ``score``, ``flagged`` and
    ``decision.label`` (the label the decision acts on: the model's, since a detector never relabels).
    """
    from .io import table_metadata

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
        _ApplyActor, fn_constructor_args=(spec, None if metadata is None else dict(metadata),
                                          None if shapes is None else dict(shapes), device,
                                          int(num_cpus) if not num_gpus else 0),
        batch_format="pyarrow", batch_size=batch_rows, compute=compute, num_cpus=num_cpus, num_gpus=num_gpus,
        zero_copy_batch=True)
