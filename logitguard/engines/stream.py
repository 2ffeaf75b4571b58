"""The streamed engine: the CLI's apply commands in this process, memory bounded by the batch size, not the table.

Each function takes a table on disk, a `TableSource` (the rows of one split, ``TableSource(path, split="test")``)
or a path (the whole table), and reads it in record batches (`logitguard.tables.stream_batches`,
each validated as `read_table` validates a whole table and held to the first batch's C and K), hands every
batch to the one apply path (`logitguard.defenses.apply.apply_batch`), writes what it returns batch by batch
into the staged output of `write_batches` (committed whole at the end), and keeps only the rows' keys and
decisions (`RowKeys`, tens of bytes per row) for the report (`logitguard.engines.report`). Batch size:
`stream_batch_rows` (about 8 MiB of logits; ``LOGITGUARD_BATCH_ROWS`` overrides it).

- `summarize_path` (``inspect``), `correct_path` (``correct``), `evaluate_path` (``evaluate``),
  `detect_path` (``detect``), `defend_path` (``defend`` and ``guard apply``); `apply_path` under them all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..defenses.apply import apply_batch, check_input, decide, needs_noise, output_columns
from ..tables import (LogitTable, RowCollector, RowKeys, TableSource, noise_queries, read_keys, table_columns,
                      write_batches)
from ..tables.stream import all_columns, stream_batches
from ..tables.threat import NO_DEFENSE
from .report import corrected_summary, defense_report, detection_report, table_summary

__all__ = ["PARTITIONS", "apply_path", "correct_path", "defend_path", "detect_path", "evaluate_path",
           "summarize_path"]

PARTITIONS = ("split", "attack")


def apply_path(defense: Any, path: TableSource | str | os.PathLike, out: str | os.PathLike | None = None, *,
               columns: Sequence[str] | None = None, partition_by: Sequence[str] | None = PARTITIONS,
               basename: str = "part", overwrite: bool = False,
               batch_rows: int | None = None) -> tuple[list[Path], RowKeys]:
    """`apply_batch(defense, batch)` on every row of `path` (a `TableSource` or a path), batch by batch.

    `columns`: the optional columns to read (default: what the defense needs, `output_columns`). With `out`,
    the output rows are written there (`write_batches`: a file with ``partition_by=None``, else a partitioned
    directory), committed only once every batch was decided and the keys proved unique.
    Returns (files written, the rows' keys with the `Decision` fields as values)."""
    available = table_columns(path)
    check_input(defense, available)
    columns = output_columns(defense, available) if columns is None else list(columns)
    collector = RowCollector()
    batches = stream_batches(path, columns=columns, batch_rows=batch_rows)
    if out is None:
        for batch in batches:
            collector.add(apply_batch(defense, batch, output=False).keys)
        return [], collector.finish()

    def outputs() -> Iterator[LogitTable]:
        for batch in batches:
            applied = apply_batch(defense, batch)
            collector.add(applied.keys)
            yield applied.output
        collector.finish()  # duplicate keys: an error before anything is committed

    written = write_batches(outputs(), out, partition_by=partition_by, basename=basename, overwrite=overwrite)
    return written, collector.finish()


def summarize_path(path: TableSource | str | os.PathLike, *, batch_rows: int | None = None) -> dict[str, Any]:
    """`summarize(read_table(path))`, streamed. Every column is read and validated, as `read_table` does."""
    _, rows = apply_path(None, path, columns=all_columns(path), batch_rows=batch_rows)
    queries = noise_queries(path)
    return table_summary(rows, noise_queries=None if queries is None else tuple(queries))


def correct_path(corrector: Any, path: TableSource | str | os.PathLike, out: str | os.PathLike, *,
                 partition_by: Sequence[str] | None = PARTITIONS, basename: str = "corrected",
                 overwrite: bool = False, batch_rows: int | None = None) -> tuple[list[Path], dict[str, Any]]:
    """`corrector.correct_table` on every row of `path`, written to `out`, and the `summarize` of the corrected
    table. Returns (files written, summary)."""
    written, rows = apply_path(corrector, path, out, partition_by=partition_by, basename=basename,
                               overwrite=overwrite, batch_rows=batch_rows)
    return written, corrected_summary(rows)


def evaluate_path(path: TableSource | str | os.PathLike, defenses: Mapping[str, Any] | None = None, *,
                  attacks: Sequence[str] | None = None, batch_rows: int | None = None) -> pd.DataFrame:
    """`evaluate(read_table(path), defenses, attacks=attacks)`, streamed (`path`: rows of one split,
    ``TableSource(path, split="test")``): one pass decides every defense's label per row (`decide`), then the
    records come from those."""
    from ..evaluation.evaluate import check_defenses, evaluation_records, select_attacks
    from ..tables import CLEAN

    check_defenses(defenses or {})
    keys = read_keys(path)
    attacks = select_attacks(keys, attacks)
    defenses = dict(defenses or {})
    names = list(defenses)
    noise = any(needs_noise(d) for d in defenses.values())
    for defense in defenses.values():
        check_input(defense, table_columns(path))
    wanted = None if CLEAN not in keys.attacks or set(keys.attacks) == {CLEAN, *attacks} else [CLEAN, *attacks]
    collector = RowCollector()
    for batch in stream_batches(path, attacks=wanted, columns=["noisy_logits"] if noise else [],
                                batch_rows=batch_rows):
        labels = {f"defense{i}": decide(defenses[name], batch.logits,
                                        batch.noisy_logits if needs_noise(defenses[name]) else None).label
                  for i, name in enumerate(names)}
        collector.add(batch, model_label=batch.logits.argmax(axis=1), **labels)
    rows = collector.finish()
    # As in `evaluate`: the bare model first (a caller's own "none" takes its place).
    predictions = {NO_DEFENSE: rows.values["model_label"]}
    predictions |= {name: rows.values[f"defense{i}"] for i, name in enumerate(names)}
    return evaluation_records(rows, predictions, attacks)


def detect_path(detector: Any, path: TableSource | str | os.PathLike, *,
                batch_rows: int | None = None) -> dict[str, Any]:
    """What ``logitguard detect`` reports, streamed: ``flagged_rate`` (attack -> share of rows flagged) and
    ``metrics`` (`detection_table` of the rows, of one split: ``TableSource(path, split="test")``; None when
    the rows are unlabelled or lack clean rows or attacks)."""
    _, rows = apply_path(detector, path, batch_rows=batch_rows)
    return detection_report(rows, detector.kind, detector.threshold_)


def defend_path(defense: Any, path: TableSource | str | os.PathLike, out: str | os.PathLike, *,
                partition_by: Sequence[str] | None = PARTITIONS, basename: str = "defended", overwrite: bool = False,
                batch_rows: int | None = None) -> dict[str, Any]:
    """A `GatedDefense` or a `Guard` on every row of `path` (a `TableSource` or a path), written to `out` batch by
    batch (``pred``, null where rejected, and ``flagged``), and what ``logitguard defend`` reports about it.

    Returns a dict: ``written`` (files), ``flagged_rate`` and ``rejected_rate`` (attack -> share of rows) and
    ``evaluation`` (`engines.report.defense_report`)."""
    written, rows = apply_path(defense, path, out, partition_by=partition_by, basename=basename,
                               overwrite=overwrite, batch_rows=batch_rows)
    return {"written": written, **defense_report(rows)}
