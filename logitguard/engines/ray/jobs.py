"""The jobs ``--engine ray`` runs (``correct``, ``detect``, ``defend``, ``guard apply``), as library functions
that return what the streamed engine returns (`logitguard.engines.stream`): the CLI prints either the same way.

Each job reads the table with `LogitTableDatasource`, applies the defense in `actors.apply_ray`, writes with
`io.write_rows` (or collects a detector's rows), and reports from the rows' decisions through the one report
path (`logitguard.engines.report`), exactly as the streamed engine does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data

from ...defenses.apply import apply_batch, check_input
from ...errors import TableError
from ...tables import LogitTable, TableSource, conform, read_table, table_columns
from ...tables.validation import row_shapes
from ..report import corrected_summary, defense_report, detection_report
from .actors import DefenseSpec, apply_ray, rows_of
from .connection import RayErrors, init_ray
from .io import LogitTableDatasource, read_units, write_rows

__all__ = ["correct", "defend", "detect"]


def _prepare(table: TableSource | str, spec: DefenseSpec,
             workers: int | None) -> tuple[ray.data.Dataset, Any, dict[str, Any], dict[str, Any] | None]:
    """The job's Ray pipeline, the loaded defense, the input metadata and the output metadata.

    The defense first runs here on the first row the job would read (locally, without Ray): a wrong file or
    a schema the defense refuses fails before Ray starts, the output metadata is what the streamed engine
    writes, and the first row's C and K are what every batch must have."""
    loaded = spec.load()
    available = table_columns(table)
    check_input(loaded, available)
    source = LogitTableDatasource(table, columns=spec.columns(available, loaded))
    # The first row through the Ray read path itself (no scanner read-ahead: one row group at most in memory).
    head = next(read_units(source.units, source.schema, source.source, 1024), None)
    if head is None:
        read_table(table, columns=[])  # raises the local command's error (no rows match …)
        raise TableError(f"{table}: no rows")
    first = conform(head.slice(0, 1).replace_schema_metadata(None), metadata=source.metadata)
    probe = apply_batch(loaded, first).output
    init_ray(quiet=not sys.stderr.isatty())
    # An error in an actor (a batch that breaks the contract) reaches the caller as itself, not wrapped in a
    # UserCodeException that loses it on its way back.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    result = apply_ray(ray.data.read_datasource(source), spec, metadata=first.metadata, shapes=row_shapes(first),
                       workers=workers)
    return result, loaded, first.metadata, probe.metadata if isinstance(probe, LogitTable) else None


def correct(table: TableSource | str, corrector: str, out: str, *, overwrite: bool = False,
            workers: int | None = None) -> tuple[list[Path], dict[str, Any]]:
    """``correct --engine ray``: (files written, `summarize` of the corrected table), as `stream.correct_path`."""
    result, _, metadata, out_metadata = _prepare(table, DefenseSpec("corrector", corrector), workers)
    written, parts = write_rows(result, out, metadata=out_metadata, basename="corrected", overwrite=overwrite)
    return written, corrected_summary(rows_of(parts, metadata))


def detect(table: TableSource | str, detector: str, *, workers: int | None = None) -> dict[str, Any]:
    """``detect --engine ray``: ``flagged_rate`` and ``metrics``, as `stream.detect_path` (`table`: rows of one
    split, ``TableSource(path, split="test")``)."""
    result, loaded, metadata, _ = _prepare(table, DefenseSpec("detector", detector), workers)
    with RayErrors():
        parts = [ray.get(ref) for ref in result.to_arrow_refs()]
    rows = rows_of([p for p in parts if isinstance(p, pa.Table) and p.num_rows], metadata)
    return detection_report(rows, loaded.kind, loaded.threshold_)


def defend(table: TableSource | str, spec: DefenseSpec, out: str, *, overwrite: bool = False,
           workers: int | None = None) -> tuple[Any, dict[str, Any]]:
    """``defend --engine ray`` and ``guard apply --engine ray`` (`spec.kind` ``defense`` or ``guard``): the
    `GatedDefense` applied and the report of `stream.defend_path` (``written``, ``flagged_rate``,
    ``rejected_rate``, ``evaluation``)."""
    result, loaded, metadata, out_metadata = _prepare(table, spec, workers)
    written, parts = write_rows(result, out, metadata=out_metadata, basename="defended", overwrite=overwrite)
    defense = loaded.defense if spec.kind == "guard" else loaded
    return defense, {"written": written, **defense_report(rows_of(parts, metadata))}
