"""Commands that measure defenses: `evaluate`, `transfer`, `sweep-p-clean`, `threat`, `compare-models`
and `curve`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import LogitguardError
from .options import (budgets_option, claim_output, comma_list, corrector_file_option, corrector_options, corrector_params,
                      device_option, echo_json, emit, json_option, main, progress, table_argument)


@main.command()
@table_argument
@corrector_file_option
@click.option("--split", default="test", show_default=True, help="Split to evaluate on.")
@click.option("--attacks", type=comma_list, default=None, help="Attacks to evaluate (default: all).")
@device_option
@json_option
def evaluate(table: str, corrector_path: str, split: str, attacks: list[str] | None, device: str,
             as_json: bool) -> None:
    """Clean and attacked accuracy without and with correction (full split and selected set)."""
    from ..defenses.corrector import LogitCorrector
    from ..report.evaluation import format_evaluation
    from ..engines.stream import evaluate_path
    from ..tables import TableSource

    corrector = LogitCorrector.load(corrector_path, device=device)
    results = evaluate_path(TableSource(table, split=split), {"corrector": corrector}, attacks=attacks)
    if as_json:
        echo_json(results.to_dict(orient="records"))
    else:
        click.echo(format_evaluation(results))


@main.command()
@table_argument
@click.option("--attacks", type=comma_list, default=None,
              help="Attacks to train on and evaluate (default: every attack with rows in both splits).")
@click.option("--train-split", default="train", show_default=True)
@click.option("--split", default="test", show_default=True, help="Split to evaluate on.")
@corrector_options
@json_option
def transfer(table: str, attacks: list[str] | None, train_split: str, split: str, as_json: bool,
             **kwargs: Any) -> None:
    """Transfer matrix: one corrector per attack, each evaluated on every attack (seed Table 3)."""
    from ..evaluation.evaluate import train_per_attack, transfer_matrix
    from ..report.summary import percent
    from ..tables import CLEAN, read_table

    data = read_table(table, columns=[])
    # a test split may hold attacks with no train rows to learn from (e.g. those aimed at a defense)
    both = set(data.select(split=train_split).attacks) & set(data.select(split=split).attacks)
    attacks = attacks or [a for a in data.attacks if a != CLEAN and a in both]
    correctors = train_per_attack(data.select(split=train_split), attacks, progress=progress(),
                                  **corrector_params(kwargs))
    matrix = transfer_matrix(data.select(split=split), correctors, attacks=attacks)
    if as_json:
        echo_json(matrix.to_dict(orient="index"))
    else:
        click.echo("accuracy after correction; rows: evaluated on, columns: trained on")
        click.echo(matrix.map(percent).to_string())


@main.command("sweep-p-clean")
@table_argument
@click.option("--attacks", type=comma_list, required=True, help="Attack(s) to train on.")
@click.option("--values", type=comma_list, default="0,0.1,0.3,0.5,0.7,0.9", show_default=True,
              help="p_clean values to try.")
@click.option("--train-split", default="train", show_default=True)
@click.option("--split", default="test", show_default=True, help="Split to evaluate on.")
@corrector_options
@json_option
def sweep_p_clean(table: str, attacks: list[str], values: list[str], train_split: str, split: str,
                  as_json: bool, **kwargs: Any) -> None:
    """Clean-vs-robust trade-off: one corrector per p_clean value."""
    from ..evaluation.evaluate import sweep_p_clean as sweep
    from ..report.summary import percent
    from ..tables import read_table

    params = corrector_params(kwargs)
    params.pop("p_clean")
    try:
        grid = [float(v) for v in values]
    except ValueError:
        raise click.BadParameter(f"expected numbers, got {','.join(values)}", param_hint="--values") from None
    if not grid:
        raise click.BadParameter("give at least one p_clean value, e.g. 0,0.5", param_hint="--values")
    data = read_table(table, columns=[])
    results = sweep(data.select(split=train_split), data.select(split=split), attacks, grid, progress=progress(),
                    **params)
    if as_json:
        echo_json(results.reset_index().to_dict(orient="records"))
    else:
        click.echo(results.map(percent).to_string())

@main.command()
@table_argument
@click.option("--defenses", "manifest", required=True, type=click.Path(dir_okay=False),
              help="A pipeline manifest (defenses.json): named detector / corrector / on_flag pipelines.")
@budgets_option()
@click.option("--split", default="test", show_default=True, help="Split to evaluate on.")
@click.option("--reference", type=click.Path(dir_okay=False), default=None,
              help="A compare-models result (robust accuracy of the project's classifiers) for Tramèr's eps/2 "
                   "check  [default: models/comparison.json beside TABLE, when present]")
@json_option
def threat(table: str, manifest: str, budgets: str, split: str, reference: str | None, as_json: bool) -> None:
    """Robust accuracy per threat model (per-sample worst case, every figure with its 95% interval) for every
    pipeline, the share of successful attacks each detector misses, Tramèr's eps/2 check, the
    attack-failure indicators and what a query attacker gets from scores (docs/threat-models.md)."""
    from ..defenses.pipelines import load_pipelines
    from ..evaluation.access import query_access_table
    from ..report.threat_text import format_query_access
    from ..evaluation.checks import attack_failure_indicators, load_reference, tramer_check
    from ..report.threat_text import format_indicators, format_tramer
    from ..tables import CLEAN, TableSource, read_table
    from ..evaluation.threat import detector_miss_table, threat_model_table, to_records
    from ..report.threat_text import format_detector_misses, format_threat_models
    from ..tables.threat import parse_budgets

    eps = parse_budgets(budgets)
    specs = load_pipelines(manifest)
    if reference is None:
        reference = str(Path(table).resolve().parent / "models" / "comparison.json")
    elif not Path(reference).is_file():
        raise LogitguardError(f"no such file: {reference}")
    data = read_table(TableSource(table, split=split))
    pipelines = {name: spec.build() for name, spec in specs.items()}
    detectors = {name: p.detector for name, p in pipelines.items() if p.detector is not None}
    results = threat_model_table(data, pipelines, budgets=eps)
    misses = detector_miss_table(data, detectors, budgets=eps)
    clean = data.select(attacks=CLEAN)
    base = float((clean.logits.argmax(axis=1) == clean.labels).mean())
    tramer = tramer_check(results, load_reference(reference), gated=list(detectors), base_accuracy=base)
    indicators = attack_failure_indicators(data, pipelines, budgets=eps)
    access = query_access_table(data, pipelines, budgets=eps)
    emit({"threat_models": to_records(results), "detector_misses": to_records(misses),
          "tramer": to_records(tramer), "indicators": to_records(indicators), "query_access": to_records(access)},
         as_json, "\n\n".join([format_threat_models(results), format_detector_misses(misses), format_tramer(tramer),
                                format_indicators(indicators), format_query_access(access)]))


@main.command("compare-models")
@click.argument("models", nargs=-1, required=True)
@click.option("--pipeline", default="ln-reject", show_default=True,
              help="The logit pipeline (a name in each model's manifest) measured beside each bare model.")
@budgets_option()
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="JSON file for the results (the demo reads data/models/comparison.json).")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@json_option
def compare_models(models: tuple[str, ...], pipeline: str, budgets: str, out: str, force: bool,
                   as_json: bool) -> None:
    """Model-side defenses beside a logit pipeline: MODELS are NAME=TABLE:MANIFEST, one per trained model
    (docs/model-side.md). Robust accuracy per threat model with and without the pipeline, detector AUROCs."""
    from ..files import atomic_output
    from ..evaluation.modelside import compare_models as compare, parse_model_specs
    from ..report.modelside import format_model_side
    from ..tables.threat import parse_budgets

    specs, eps = parse_model_specs(models), parse_budgets(budgets)
    claim_output(out, force, directory=False)
    results = compare(specs, pipeline=pipeline, budgets=eps)
    with atomic_output(out, overwrite=force) as tmp:
        tmp.write_text(json.dumps(results, indent=2, allow_nan=False, default=float) + "\n")
    emit(results, as_json, "\n".join(format_model_side(results)) + f"\nwrote {out}")


@main.command()
@table_argument
@click.option("--sweep", "sweeps", multiple=True, metavar="ATTACK.PARAM",
              help="Sweep(s) to draw, e.g. pgd.eps (repeatable; default: every sweep in the table).")
@click.option("--defense", "defenses", multiple=True, metavar="PATH",
              help="A guard file, MANIFEST.json:NAME (one pipeline) or MANIFEST.json (all of it); repeatable.")
@click.option("--x", "x_axis", type=click.Choice(["param", "eps", "linf", "l2"]), default="param", show_default=True,
              help="x axis: the swept parameter's value (eps: it must be eps), or the rows' mean measured L∞ / L2.")
@click.option("--split", default="test", show_default=True, help="Split to evaluate on.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for curve.json and curve.png.")
@click.option("--force", is_flag=True, help="Replace curve.json / curve.png in --out.")
@json_option
def curve(table: str, sweeps: tuple[str, ...], defenses: tuple[str, ...], x_axis: str, split: str, out: str,
          force: bool, as_json: bool) -> None:
    """Robustness curves: accuracy (and detection rate) per value of each swept attack, without and with
    defenses; the clean rows are the value-0 point (docs/curves.md)."""
    from ..evaluation.curves import curve_path, load_defenses
    from ..report.curves import FILES, format_curves, write_curves
    from ..tables import TableSource

    claim_output(out, force, directory=True, merge=True, extra=tuple(str(Path(out) / f) for f in FILES))
    result = curve_path(TableSource(table, split=split), load_defenses(defenses), sweeps=list(sweeps) or None,
                        x=x_axis)
    written = write_curves(result, out, overwrite=force)
    emit({**result, **written}, as_json, "\n".join(
        [format_curves(result), "", f"wrote {', '.join(written['files'])}"]
        + ([f"curve.png {written['plot']}"] if written["plot"] else [])))
