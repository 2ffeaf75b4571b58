"""The CLI's apply paths, streamed: memory bounded by the batch size, not by the table.

Each function here takes the *path* of a table and reads it in record batches (`iter_batches`), holding one
batch of logits at a time plus a few numbers per row (keys, labels, predictions, scores: a `RowKeys`, tens
of bytes per row). Outputs are written batch by batch into the staged file or directory of
`write_batches`, committed whole at the end. Results equal those of the in-memory functions on the loaded
table (`summarize`, `evaluate`, `detection_table`, `GatedDefense.defend_table`, …): counts, accuracies and
AUROC come from the same per-row values. Batch size: `stream_batch_rows` (about 8 MiB of logits per batch;
the environment variable ``LOGITGUARD_BATCH_ROWS`` overrides it).

- `summarize_path` (``inspect``), `correct_path` (``correct``), `evaluate_path` (``evaluate``),
  `detect_path` (``detect``), `defend_path` (``defend``; `Guard.defend_path` for ``guard apply``);
  ``explain`` streams through `logitguard.explain.explain_path`, ``fit-detector`` through
  `Detector.fit_path`.
- `TableStream`: one filtered view of a table that can be read in several passes (same rows, same order),
  with `TableStream.collect` to compute something on chosen rows (the detectors' streamed fitting).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import LogitguardError, TableError
from ..defenses.decision import ABSTAIN
from . import (CLEAN, OPTIONAL_COLUMNS, LogitTable, RowCollector, RowKeys, iter_batches, read_keys,
               stream_batch_rows, table_columns, write_batches)

if TYPE_CHECKING:
    from ..defenses.corrector import LogitCorrector
    from ..defenses.gated import Decision, GatedDefense
    from ..defenses.detectors import Detector

__all__ = ["TableStream", "correct_path", "defend_path", "detect_path", "evaluate_path", "summarize_path"]

PARTITIONS = ("split", "attack")


class TableStream:
    """The rows of `path` that match `split` and `attacks`, read batch by batch as often as needed.

    `keys` (read up front from the key columns alone, or given) numbers the rows 0..N-1 in stream order;
    every pass checks that it meets the same rows in the same order (a table rewritten in between is an
    error, not a silent mix-up).
    """

    def __init__(self, path: str | os.PathLike, *, split: str | None = None, attacks: Sequence[str] | None = None,
                 columns: Sequence[str] = (), batch_rows: int | None = None, keys: RowKeys | None = None) -> None:
        self.path = Path(path)
        self.split = split
        self.attacks = None if attacks is None else list(attacks)
        self.columns = list(columns)
        self.batch_rows = batch_rows or stream_batch_rows(self.path, self.columns)
        self.keys = read_keys(self.path, split=split, attacks=self.attacks) if keys is None else keys

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, attacks: Sequence[str] | None = None, *, columns: Sequence[str] | None = None
                ) -> Iterator[tuple[np.ndarray, LogitTable]]:
        """(global row numbers, batch) over the stream's rows, or only those of `attacks`; the stream's optional
        columns, or only `columns`."""
        rows = np.arange(len(self.keys)) if attacks is None else np.flatnonzero(np.isin(self.keys.attack, attacks))
        start = 0
        for batch in iter_batches(self.path, split=self.split, attacks=self.attacks if attacks is None else attacks,
                                  columns=self.columns if columns is None else columns, batch_rows=self.batch_rows):
            index = rows[start:start + len(batch)]
            if len(index) != len(batch) or not np.array_equal(self.keys.sample_id[index], batch.sample_id):
                raise TableError(f"{self.path}: the table changed while it was being read; run again")
            start += len(batch)
            yield index, batch
        if start != len(rows):
            raise TableError(f"{self.path}: the table changed while it was being read; run again")
        pa.default_memory_pool().release_unused()  # give the pass's buffers back before the next step

    def each(self, rows: np.ndarray, fn: Callable[[np.ndarray, np.ndarray, np.ndarray | None], None], *,
             noise: bool = False) -> None:
        """Call ``fn(positions, logits, noisy_logits)`` batch by batch for the stream's rows `rows` (global row
        numbers, any order): `positions` are the places in `rows` of the batch's wanted rows, `logits` their
        float32 logits (B, C), `noisy_logits` their noise queries (B, K, C) with `noise`, else None. Only
        batches of the wanted rows' attacks are read, and the noise column only with `noise`."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        position = np.full(len(self.keys), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        columns = self.columns if noise else [c for c in self.columns if c != "noisy_logits"]
        for index, batch in self.batches(attacks=sorted(set(self.keys.attack[rows])), columns=columns):
            where = position[index]
            wanted = where >= 0
            if wanted.all():
                fn(where, batch.logits, batch.noisy_logits if noise else None)
            elif wanted.any():
                fn(where[wanted], batch.logits[wanted], batch.noisy_logits[wanted] if noise else None)

    def collect(self, rows: np.ndarray, fn: Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, ...]], *,
                noise: bool = False) -> list[np.ndarray]:
        """`fn(logits, noisy_logits)` on the stream's rows `rows` (as in `each`): each array that `fn` returns,
        for all of `rows`, in the order of `rows`."""
        outputs: list[np.ndarray] = []

        def keep(where: np.ndarray, logits: np.ndarray, noisy: np.ndarray | None) -> None:
            results = [np.asarray(r) for r in fn(logits, noisy)]
            if not outputs:
                outputs.extend(np.empty((len(rows), *r.shape[1:]), dtype=r.dtype) for r in results)
            for out, result in zip(outputs, results):
                out[where] = result

        self.each(rows, keep, noise=noise)
        if not outputs:
            raise LogitguardError("no rows to compute on")
        return outputs


def all_columns(path: str | os.PathLike) -> list[str]:
    """The optional columns present in the table at `path` (what `read_table` reads by default)."""
    present = table_columns(path)
    return [c for c in OPTIONAL_COLUMNS if c in present]


def stream_batches(path: str | os.PathLike, *, split: str | None = None, attacks: Sequence[str] | None = None,
                   columns: Sequence[str] = (), batch_rows: int | None = None) -> Iterator[LogitTable]:
    """`iter_batches` of the rows the streamed passes read (refusing a selection with no rows), `batch_rows`
    defaulting to `stream_batch_rows` for the table and `columns`."""
    return iter_batches(path, split=split, attacks=attacks, columns=columns,
                        batch_rows=batch_rows or stream_batch_rows(path, columns), require_rows=True)


def _norms(batch: LogitTable) -> dict[str, np.ndarray]:
    return {name: batch.column(name) for name in ("linf", "l2") if name in batch.columns}


# ---------------------------------------------------------------------------------------------
# inspect and correct


def summarize_path(path: str | os.PathLike, *, batch_rows: int | None = None) -> dict[str, Any]:
    """`summarize(read_table(path))`, streamed. Every column is read and validated, as `read_table` does."""
    from ..report.summary import summarize_rows

    collector = RowCollector()
    noise = None
    for batch in stream_batches(path, columns=all_columns(path), batch_rows=batch_rows):
        collector.add(batch, model_label=batch.logits.argmax(axis=1), **_norms(batch))
        if batch.noisy_logits is not None:
            noise = batch.noisy_logits.shape[1:]
    return summarize_rows(collector.finish(), noise_queries=noise)


def correct_path(corrector: LogitCorrector, path: str | os.PathLike, out: str | os.PathLike, *,
                 partition_by: Sequence[str] | None = PARTITIONS, basename: str = "corrected",
                 overwrite: bool = False, batch_rows: int | None = None) -> tuple[list[Path], dict[str, Any]]:
    """`corrector.correct_table` on every row of `path`, written to `out` (`write_batches`: a file with
    ``partition_by=None``, else a partitioned directory), and the `summarize` of the corrected table.

    Returns (files written, summary)."""
    from ..report.summary import summarize_rows

    collector = RowCollector()
    columns = [c for c in ("linf", "l2") if c in table_columns(path)]

    def corrected() -> Iterator[LogitTable]:
        for batch in stream_batches(path, columns=columns, batch_rows=batch_rows):
            fixed = corrector.correct_table(batch)
            collector.add(fixed, model_label=fixed.logits.argmax(axis=1), **_norms(fixed))
            yield fixed
        collector.finish()  # duplicate keys: an error before anything is committed

    written = write_batches(corrected(), out, partition_by=partition_by, basename=basename, overwrite=overwrite)
    return written, summarize_rows(collector.finish())


# ---------------------------------------------------------------------------------------------
# evaluate and detect


def evaluate_path(path: str | os.PathLike, defenses: Mapping[str, Any] | None = None, *, split: str | None = "test",
                  attacks: Sequence[str] | None = None, batch_rows: int | None = None) -> pd.DataFrame:
    """`evaluate(read_table(path, split=split), defenses, split=split, attacks=attacks)`, streamed: one pass
    computes every defense's labels per row, then the records come from those (`evaluation_records`)."""
    from ..evaluation.evaluate import evaluation_records, select_attacks
    from .threat import NO_DEFENSE

    keys = read_keys(path, split=split)
    keys, attacks = select_attacks(keys, split, attacks)
    defenses = dict(defenses or {})
    names = list(defenses)
    columns = ["noisy_logits"] if any(getattr(d, "needs_noise", False) for d in defenses.values()) else []
    wanted = None if CLEAN not in keys.attacks or set(keys.attacks) == {CLEAN, *attacks} else [CLEAN, *attacks]
    collector = RowCollector()
    for batch in stream_batches(path, split=split, attacks=wanted, columns=columns, batch_rows=batch_rows):
        labels = {f"defense{i}": np.asarray(defenses[name].predict_table(batch)) for i, name in enumerate(names)}
        collector.add(batch, model_label=batch.logits.argmax(axis=1), **labels)
    rows = collector.finish()
    # As in `evaluate`: the bare model first (a caller's own "none" takes its place).
    predictions = {NO_DEFENSE: rows.values["model_label"]}
    predictions |= {name: rows.values[f"defense{i}"] for i, name in enumerate(names)}
    return evaluation_records(rows, predictions, attacks)


def detect_path(detector: Detector, path: str | os.PathLike, *, split: str | None = "test",
                batch_rows: int | None = None) -> dict[str, Any]:
    """What ``logitguard detect`` reports, streamed: ``flagged_rate`` (attack -> share of rows flagged) and
    ``metrics`` (`detection_table` of the split, or None when the rows are unlabelled or lack clean rows
    or attacks), from one pass that keeps each row's score."""
    from ..evaluation.evaluate import detection_records

    _check_noise(detector, path, f"the {detector.kind!r} detector needs noise queries (column 'noisy_logits')")
    column = getattr(detector, "input_column", None)
    if column is not None and column not in table_columns(path):
        raise LogitguardError(detector._missing_column())
    collector = RowCollector()
    for batch in stream_batches(path, split=split, columns=_noise_columns(detector), batch_rows=batch_rows):
        collector.add(batch, model_label=batch.logits.argmax(axis=1), score=detector.score_table(batch))
    rows = collector.finish()
    flagged = rows.values["score"] > detector.threshold_
    rates = {a: float(flagged[rows.attack == a].mean()) for a in rows.attacks}
    metrics = None
    if rows.has_labels and CLEAN in rows.attacks and len(rows.attacks) > 1:
        metrics = detection_records(rows, {detector.kind: rows.values["score"]}, {detector.kind: detector.threshold_},
                                    [a for a in rows.attacks if a != CLEAN])
    return {"flagged_rate": rates, "metrics": metrics}


def _noise_columns(part: Any) -> list[str]:
    """The optional columns `part` reads: the noise queries where it needs them, a detector's `input_column`."""
    column = getattr(part, "input_column", None)
    return (["noisy_logits"] if getattr(part, "needs_noise", False) else []) + ([column] if column else [])


def _check_noise(part: Any, path: str | os.PathLike, message: str) -> None:
    if getattr(part, "needs_noise", False) and "noisy_logits" not in table_columns(path):
        raise LogitguardError(message)


# ---------------------------------------------------------------------------------------------
# defend


def defend_path(defense: GatedDefense, path: str | os.PathLike, out: str | os.PathLike, *, split: str | None = None,
                partition_by: Sequence[str] | None = PARTITIONS, basename: str = "defended", overwrite: bool = False,
                batch_rows: int | None = None, check: Callable[[LogitTable], None] | None = None) -> dict[str, Any]:
    """`defense.defend_table` on every row of `path` (only `split` when given), written to `out` batch by batch
    (`write_batches`), and what ``logitguard defend`` reports about it.

    `check(batch)` runs on each batch before it is defended (`Guard.defend_path` checks the guard's schema).
    Returns a dict: ``written`` (files), ``flagged_rate`` and ``rejected_rate`` (attack -> share of rows) and
    ``evaluation`` (`evaluate` of the defense beside the bare model on the ``test`` split, or on `split`,
    when the rows are labelled and have clean rows and attacks; else None).
    """
    from ..evaluation.evaluate import evaluation_records, select_attacks
    from .threat import NO_DEFENSE

    collector = RowCollector()

    def defended() -> Iterator[LogitTable]:
        for batch in stream_batches(path, split=split, columns=all_columns(path), batch_rows=batch_rows):
            if check is not None:
                check(batch)
            decision: Decision = defense.check_table(batch)
            collector.add(batch, model_label=decision.model_label, label=decision.label, flagged=decision.flagged)
            yield defense.apply_decision(batch, decision)
        collector.finish()  # duplicate keys: an error before anything is committed

    written = write_batches(defended(), out, partition_by=partition_by, basename=basename, overwrite=overwrite)
    rows = collector.finish()
    evaluation = None
    if rows.has_labels and CLEAN in rows.attacks and len(rows.attacks) > 1:
        test = split or ("test" if "test" in rows.splits else None)
        chosen, attacks = select_attacks(rows, test, None)
        evaluation = evaluation_records(
            chosen, {NO_DEFENSE: chosen.values["model_label"], "gated": chosen.values["label"]}, attacks)
    by_attack = {a: rows.attack == a for a in rows.attacks}
    return {
        "written": written,
        "flagged_rate": {a: float(rows.values["flagged"][m].mean()) for a, m in by_attack.items()},
        "rejected_rate": {a: float((rows.values["label"][m] == ABSTAIN).mean()) for a, m in by_attack.items()},
        "evaluation": evaluation,
    }
