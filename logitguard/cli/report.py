"""Commands that explain and report: `explain` and `demo` (the main job's Markdown report)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import LogitguardError
from .options import (claim_output, comma_list, corrector_file_option, device_option, echo_json, json_option, main,
                      table_argument)


@main.command()
@table_argument
@corrector_file_option
@click.option("--attacks", type=comma_list, default=None, help="Attacks to explain (default: all).")
@click.option("--split", default="test", show_default=True)
@click.option("--k", type=int, default=None, help="Supporting classes per row (default: a third of C, at most 10).")
@click.option("--top", type=int, default=3, show_default=True, help="Classes to list per attack.")
@device_option
@json_option
def explain(table: str, corrector_path: str, attacks: list[str] | None, split: str, k: int | None, top: int,
            device: str, as_json: bool) -> None:
    """Supporting classes of a corrector per attack, their Bhattacharyya similarity, and an ablation."""
    from .. import explain as ex
    from ..defenses.corrector import LogitCorrector
    from ..tables import TableSource

    if top < 1:
        raise click.BadParameter(f"must be at least 1, got {top}", param_hint="--top")
    corrector = LogitCorrector.load(corrector_path, device=device)
    freqs, ablations = ex.explain_path(corrector, TableSource(table, split=split), attacks, k=k)
    bc = ex.bhattacharyya_matrix(freqs)
    if as_json:
        echo_json({"frequencies": freqs.to_dict(orient="dict"), "top": ex.top_classes_per_attack(freqs, top),
                   "bhattacharyya": bc.to_dict(orient="index"), "ablation": ablations})
        return
    click.echo(f"top-{top} supporting classes (k={ablations[0]['k']} per row, true class left out):")
    for attack, names in ex.top_classes_per_attack(freqs, top).items():
        click.echo(f"  {attack}: {', '.join(names)}")
    click.echo("\nBhattacharyya coefficient between attacks:")
    click.echo(bc.round(3).to_string())
    click.echo("\nablation (corrected accuracy): as is / supporting classes lowered / random classes lowered")
    for a in ablations:
        click.echo(f"  {a['attack']}: {100 * a['accuracy']:.1f}% / {100 * a['accuracy_supporting_lowered']:.1f}% / "
                   f"{100 * a['accuracy_random_lowered']:.1f}%  (delta {a['delta']:g})")


@main.command()
@click.option("--data", default=None, type=click.Path(),
              help="The logit table to analyse (needs train and test splits, clean rows and attacks).  [default: "
                   "data/fashion-mnist in the current directory, else in the logitguard checkout]")
@click.option("--out", default="demo-report", show_default=True, type=click.Path(file_okay=False),
              help="Directory for report.md, summary.json and the figures.")
@click.option("--defenses", default=None, type=click.Path(dir_okay=False),
              help="Manifest of the saved pipelines for the threat-model section  [default: "
                   "defenses/defenses.json beside --data]")
@click.option("--reference", default=None, type=click.Path(),
              help="The seed papers' published figures (seed-figures.json or its folder) quoted in the report  "
                   "[default: shared/reference above the checkout]")
@click.option("--no-plots", is_flag=True, help="Skip the figures (no matplotlib needed).")
@click.option("--force", is_flag=True, help="Replace an existing report in --out.")
@json_option
def demo(data: str | None, out: str, defenses: str | None, reference: str | None, no_plots: bool, force: bool,
         as_json: bool) -> None:
    """The main job: train, evaluate and explain everything on a table; write a Markdown report."""
    from ..report.demo import run_demo

    data = str(default_demo_data()) if data is None else data
    claim_output(out, force, directory=True, merge=True)
    log = (lambda message: click.echo(message, err=True))
    summary = run_demo(data, out, overwrite=force, log=log, plots=not no_plots, defenses=defenses,
                       reference=reference)
    if as_json:
        echo_json(json.loads(json.dumps(summary, default=str)))
    else:
        click.echo(f"report: {Path(out) / 'report.md'} ({summary['seconds']:.0f} s)")


DEMO_DATA = Path("data") / "fashion-mnist"


def default_demo_data() -> Path:
    """The demo's table when --data is not given: data/fashion-mnist under the current directory, else under
    the checkout this package runs from (so the demo works from any directory), else an Error naming --data."""
    checkout = Path(__file__).resolve().parents[2]
    for candidate in (DEMO_DATA, checkout / DEMO_DATA):
        if candidate.exists():
            return candidate
    raise LogitguardError(f"no logit table at {DEMO_DATA} (the default) here or in {checkout}; pass --data PATH "
                          f"(a table from `logitguard-produce export`)")
