"""The `guard` commands: fit a deployable defense into one file, apply it to a table, describe it."""

from __future__ import annotations

import click

from ..errors import LogitguardError
from .options import (ErrorReportingGroup, budgets_option, claim_output, comma_list, emit, engine_option, json_option, main, on_ray,
                      partition, report_defended, table_argument)


@main.group(cls=ErrorReportingGroup)
def guard() -> None:
    """One file for a deployable defense: fit it, apply it to a table, describe it (docs/remote-model.md)."""


@guard.command("fit")
@table_argument
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The guard file to write (.npz).")
@click.option("--detector", default="auto", show_default=True,
              help="Detector kind; auto: learned-noisy when the table has noise queries, else learned; 'none' for "
                   "a corrector alone.")
@click.option("--corrector", type=click.Choice(["corrector", "svm", "odds"]), default=None,
              help="A corrector for flagged rows (needed by --on-flag correct and agree).")
@click.option("--on-flag", type=click.Choice(["reject", "correct", "agree"]), default="reject", show_default=True,
              help="What a flagged row gets: no label, the corrector's label, or the model's label only when the "
                   "corrector agrees.")
@click.option("--fpr", type=float, default=0.01, show_default=True, help="The detector's target false-positive rate.")
@click.option("--attacks", type=comma_list, default=None,
              help="Attacked rows the supervised parts learn from (default: every oblivious attack in train).")
@click.option("--from-pipeline", "pipeline", default=None, metavar="MANIFEST:NAME",
              help="Package an already fitted pipeline of a manifest instead of fitting (keeps the adaptive "
                   "figures measured against those very files).")
@budgets_option("L-inf budgets for the threat figures.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing guard file.")
@json_option
def guard_fit(table: str, out: str, detector: str | None, corrector: str | None, on_flag: str, fpr: float,
              attacks: list[str] | None, pipeline: str | None, budgets: str, seed: int, force: bool,
              as_json: bool) -> None:
    """Fit a guard on the train split of TABLE, measure it per threat model on the test split, save it."""
    from ..evaluation.guard import describe_guard, fit_guard, guard_from_pipeline
    from ..report.guard import format_guard_info
    from ..tables.threat import parse_budgets

    claim_output(out, force, directory=False)
    eps = parse_budgets(budgets)
    if pipeline is not None:
        manifest, sep, name = pipeline.rpartition(":")
        if not sep or not manifest or not name:
            raise LogitguardError(f"--from-pipeline takes MANIFEST:NAME, got {pipeline!r}")
        fitted = guard_from_pipeline(manifest, name, table, budgets=eps)
    else:
        fitted = fit_guard(table, detector=None if detector == "none" else detector, corrector=corrector,
                           on_flag=on_flag, fpr=fpr, attacks=attacks, seed=seed, budgets=eps)
    fitted.save(out, overwrite=force)
    info = describe_guard(fitted)
    emit({"out": out, **info}, as_json, f"wrote {out}\n\n" + format_guard_info(info))


@guard.command("apply")
@table_argument
@click.option("--guard", "guard_path", required=True, type=click.Path(dir_okay=False), help="A guard file.")
@click.option("--out", required=True, type=click.Path(),
              help="Output: a .parquet file, or a directory (partitioned by split and attack).")
@click.option("--split", default=None, help="Only this split (default: all).")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@engine_option
@json_option
def guard_apply(table: str, guard_path: str, out: str, split: str | None, force: bool, engine: str,
                workers: int | None, as_json: bool) -> None:
    """Check every row of TABLE with a guard; write pred (null where rejected) and flagged."""
    from ..defenses.guard import Guard
    from ..engines.stream import defend_path
    from ..tables import TableSource

    claim_output(out, force)
    source = TableSource(table, split=split)
    if scale := on_ray(engine, workers):
        defense, report = scale.defend(source, scale.DefenseSpec("guard", guard_path), out, overwrite=force,
                                       workers=workers)
    else:
        loaded = Guard.load(guard_path)
        defense, report = loaded.defense, defend_path(loaded, source, out, partition_by=partition(out),
                                                      overwrite=force)
    report_defended(defense, report, out, as_json=as_json)


@guard.command("info")
@click.argument("guard_path", metavar="GUARD", type=click.Path(dir_okay=False))
@json_option
def guard_info(guard_path: str, as_json: bool) -> None:
    """Describe a guard: expected input, policy, threshold, threat-model figures, provenance."""
    from ..defenses.guard import Guard
    from ..evaluation.guard import describe_guard
    from ..report.guard import format_guard_info

    info = describe_guard(Guard.load(guard_path))
    emit(info, as_json, format_guard_info(info))
