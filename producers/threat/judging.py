"""Judging what an export through a defense wrote: judge draws, the suite's record and continuations.

A partition attacked through a randomised (noise-reading) pipeline is judged on fresh noise draws the attacker
never saw (`export_judged`; see `producers.threat.export`): draw 0 is the partition itself, draws 1..R−1 re-query
the same images (`_Replay` of what `_Recording` kept) and hold only the samples the core's NumPy pipeline did not
break on an earlier draw. The suite's record goes into the partition's threat entry (`suite_record`), and a
continuation (``after``) attacks only the samples earlier partitions left unbroken (`broken_by_partitions`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitguard.defenses.decision import ABSTAIN
from logitguard.defenses.pipelines import PipelineSpec
from logitguard.errors import LogitguardError
from logitguard.tables import LogitTable

from ..data.datasets import ImageSet
from ..errors import ProducerError
from ..export.execute import export_partition
from ..export.staging import ExportStage

# Threat-entry keys an export learns only by running the attack (not compared when resuming).
# Threat-entry keys that are results of a run (the suite's record, a query attack's counts), not settings:
# judge draw partitions leave them out.
RESULT_KEYS = ("broken_by", "indicators", "queries", "median_queries")


def suite_record(attacker: Any, name: str) -> Callable[[LogitTable, np.ndarray | None], LogitTable]:
    """The suite's `finish`: its record (sequence, broken_by, indicators) into the partition's threat entry."""
    if not hasattr(attacker, "record"):
        return lambda table, broken: table
    return lambda table, broken: _with_record(table, name, attacker.record(), broken)


def export_judged(stage: ExportStage, *, name: str, attacker: Any, meta: dict[str, Any], rows: np.ndarray, seed: int,
                  draws: int, judge: PipelineSpec | None, finish: Any, data: ImageSet, **export: Any) -> None:
    """Stage partition `name` (the attacker's images through the model, one fresh noise draw), then its judge
    draws 1..`draws`-1 (see module): the same images with fresh noise, each holding only the samples that the
    core's pipeline `judge` did not break on an earlier draw. ``finish(table, broken)`` adds the attack's own
    results (the suite's record, the queries it took) to the partition's threat entry; draw partitions carry
    the planned entry without them."""
    recording = _Recording(attacker) if draws > 1 else attacker  # the images, for the judge draws
    table = export_partition(rows=rows, attack=name, attacker=recording, metadata=meta, data=data,
                             generator_seed=[seed, zlib.crc32(f"{data.split}/{name}".encode()), 0], **export)
    judged = None if judge is None else _judge(judge)
    broken = None if judged is None else _broken(judged, table)
    stage.write(partition_rel(data.split, name), finish(table, broken))
    if draws < 2 or broken is None:
        return
    adv = torch.cat(recording.images)
    for k in range(1, draws):
        alive = np.flatnonzero(~broken)
        if not len(alive):
            break
        draw = f"{name}.r{k}"
        entry = {**{key: v for key, v in meta["threat"][name].items() if key not in RESULT_KEYS},
                 "judge_draw": k, "judge_of": name}
        draw_meta = {**meta, "attacks": {draw: meta["attacks"][name]}, "threat": {draw: entry}}
        part = export_partition(rows=rows[alive], attack=draw, attacker=_Replay(adv[alive]), metadata=draw_meta,
                                data=data, generator_seed=[seed, zlib.crc32(f"{data.split}/{draw}".encode()), 0],
                                **export)
        broken[alive] |= _broken(judged, part)
        stage.write(partition_rel(data.split, draw), part)


def staged_draws(stage: ExportStage, split: str, name: str, draws: int) -> list[str]:
    """The judge draws of `name` that an interrupted run staged (a resumed run commits them with it)."""
    rels = [partition_rel(split, f"{name}.r{k}") for k in range(1, draws)]
    return [r for r in rels if (stage.stage.path / r).exists()]


def partition_rel(split: str, name: str) -> str:
    return f"split={split}/attack={name}/shard-0-of-1.parquet"


def _judge(spec: PipelineSpec) -> Any:
    """The core's `GatedDefense` of `spec`, or None where the core cannot judge rows alone (a detector that
    reads another column: its verdict needs that column's own files)."""
    try:
        return spec.build()
    except (LogitguardError, ValueError):
        return None


def _broken(judge: Any, table: LogitTable) -> np.ndarray:
    """(N,) bool: the core pipeline answers the row wrongly and does not abstain."""
    pred = judge.predict_table(table)
    return (pred != table.labels) & (pred != ABSTAIN)


def _with_record(table: LogitTable, name: str, record: Mapping[str, Any], broken: np.ndarray | None) -> LogitTable:
    """`table` with the suite's record in its threat entry; ``judge_rejected`` per attack from the core's
    draw-0 verdicts `broken` (rows in sample-id order, as `broken_by`)."""
    broken_by = np.asarray(record["broken_by"])
    indicators = [{**ind, "judge_rejected": None if broken is None else int(((broken_by == i) & ~broken).sum())}
                  for i, ind in enumerate(record["indicators"])]
    entry = {**table.metadata["threat"][name], "sequence": record["sequence"], "broken_by": broken_by.tolist(),
             "indicators": indicators}
    return LogitTable(table.arrow, {**table.metadata, "threat": {**table.metadata["threat"], name: entry}})


class _Recording:
    """Wraps an attacker and keeps the adversarial images it returns, in order (for the judge draws)."""

    def __init__(self, attacker: Any) -> None:
        self.attacker, self.images = attacker, []

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        adv = self.attacker(images, labels, **kwargs)
        self.images.append(adv)
        return adv


def broken_by_partitions(out: Path, split: str, partitions: Sequence[str], rows: np.ndarray, spec: PipelineSpec) -> np.ndarray:
    """(len(rows),) bool: samples (sorted ids `rows`) that the core pipeline of `spec` gets wrong on a row of
    one of `partitions` in the table `out`, or of their judge draws."""
    from logitguard.tables import read_table

    # the partitions and their judge draws (`<partition>.r<k>`), by the table's directory names
    present = {d.name.removeprefix("attack=") for d in (Path(out) / f"split={split}").glob("attack=*")}
    missing = [p for p in partitions if p not in present]
    if missing:
        raise ProducerError(f"after: no partition(s) {missing} in {out} to continue from")
    judge = _judge(spec)
    if judge is None:
        raise ProducerError("after: the core cannot judge this pipeline's rows alone")
    chosen = [a for a in present if a in partitions or a.rpartition(".r")[0] in partitions]
    table = read_table(out, split=split, attacks=chosen)
    ids = table.sample_id[_broken(judge, table)]
    return np.isin(rows, ids)


class _Replay:
    """An attacker that returns stored adversarial images in order (a judge draw re-queries the same images)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.at = images, 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, generator: Any = None,
                 on_batch: Any = None) -> torch.Tensor:
        out = self.images[self.at:self.at + len(images)]
        self.at += len(images)
        if on_batch is not None:
            on_batch(len(images))
        return out
