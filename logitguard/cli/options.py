"""What every `logitguard` command shares: the command group and its error handling, the shared options,
output claims and printing (`echo_json`, `emit`).

A public module: the producer's `logitguard-produce` command builds on it too. Nothing here imports more
than click and the standard library at import time, so ``logitguard --help`` stays fast and torch-free;
each helper imports what it needs when it runs.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..errors import LogitguardError

__all__ = ["CORRECTOR_DEFAULTS", "ErrorReportingGroup", "budgets_option", "claim_output", "comma_list",
           "corrector_file_option", "corrector_options", "corrector_params", "device_option", "echo_json", "emit",
           "engine_option", "json_option", "main", "on_ray", "partition", "progress", "report_defended",
           "table_argument"]


class ErrorReportingGroup(click.Group):
    """A click group that prints LogitguardError and any OSError (a file that cannot be read or written) as
    `Error: …` (exit 1) instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LogitguardError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            from ..files import describe_os_error

            raise click.ClickException(describe_os_error(exc)) from None


def claim_output(out: str, force: bool, *, directory: bool | None = None, merge: bool = False,
                 extra: tuple[str, ...] = ()) -> None:
    """Before any work: `out` is writable, no other run is writing it, and it is not overwritten without
    --force (`merge`: a directory the command adds files to). The claim lasts until the command ends.
    `directory` None: a directory unless `out` ends in .parquet."""
    from ..files import claim_output as claim

    if directory is None:
        directory = not out.endswith(".parquet")
    lock = claim(out, force, directory=directory, merge=merge, extra=extra)
    click.get_current_context().call_on_close(lock.release)


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(func)


def table_argument(func):
    return click.argument("table", type=click.Path(path_type=str))(func)


def engine_option(func):
    """--engine local|ray and --workers: where a command runs (logitguard.engines.ray, docs/scale.md)."""
    func = click.option("--workers", type=click.IntRange(min=1), default=None,
                        help="With --engine ray: at most this many actors (default: as many as Ray can place).")(func)
    return click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                        help="local: this process; ray: Ray Data, on a local Ray or the cluster at RAY_ADDRESS "
                             "(the 'ray' extra; docs/scale.md).")(func)


def on_ray(engine: str, workers: int | None, module: str = "logitguard.engines.ray") -> Any:
    """The Ray engine's `module` when --engine ray, else None; the 'ray' extra missing is an Error, not a
    traceback."""
    if engine != "ray":
        if workers is not None:
            raise click.UsageError("--workers applies to --engine ray")
        return None
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "ray":
            raise LogitguardError("--engine ray needs the 'ray' extra: pip install 'logitguard[ray]' "
                                  f"({exc.name} is missing)") from None
        raise


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, allow_nan=False))


def emit(value: Any, as_json: bool, text: str) -> None:
    """Print `value` as JSON under --json, else the human-readable `text`."""
    if as_json:
        echo_json(value)
    else:
        click.echo(text)


@click.group(cls=ErrorReportingGroup)
@click.version_option(package_name="logitguard")
def main() -> None:
    """Detect, correct and explain adversarial attacks from a classifier's logits alone."""


class _BudgetsOption(click.Option):
    """An option whose default is `logitguard.tables.threat.DEFAULT_BUDGETS` written as ``8/255,16/255``, read
    when a default is needed (parsing, or this command's --help), never at import: `logitguard --help` does
    not import the tables."""

    def get_default(self, ctx: click.Context, call: bool = True) -> str:
        from ..tables.threat import DEFAULT_BUDGETS, format_budget

        return ",".join(format_budget(eps) for eps in DEFAULT_BUDGETS)


def budgets_option(help: str = "L-inf budgets, comma-separated numbers or fractions."):
    """--budgets, defaulting to `DEFAULT_BUDGETS` (the one copy of the default budgets)."""
    return click.option("--budgets", cls=_BudgetsOption, show_default=True, help=help)


corrector_file_option = click.option("--corrector", "corrector_path", required=True,
                                     type=click.Path(dir_okay=False), help="A file written by train-corrector.")


def comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# Mirrors LogitCorrector's defaults (the paper's) without importing it: `--help` stays free of
# scikit-learn and torch. tests/test_light.py checks they agree.
CORRECTOR_DEFAULTS = {"hidden": 10_000, "p_clean": 0.3, "epochs": 50, "lr": 5e-5, "weight_decay": 1e-4,
                       "batch_size": 256, "dropout": 0.5, "validation_fraction": 0.0, "patience": 5, "seed": 0}


def corrector_options(func):
    """Hyperparameters of `LogitCorrector` (defaults are the paper's), collected into one dict."""
    defaults = CORRECTOR_DEFAULTS
    options = [
        ("--hidden", int, "Hidden width D."),
        ("--p-clean", float, "Probability that a training sample shows its clean logits."),
        ("--epochs", int, "Passes over the training pairs."),
        ("--lr", float, "Adam step size."),
        ("--weight-decay", float, "Adam L2 penalty."),
        ("--batch-size", int, "Mini-batch size."),
        ("--dropout", float, "Dropout after the hidden layer."),
        ("--validation-fraction", float, "Share of samples held out to pick the best epoch (0: none)."),
        ("--patience", int, "With validation: epochs without improvement before stopping."),
        ("--seed", int, "Seed for initialisation, dropout and sampling."),
    ]
    for flag, kind, text in reversed(options):
        name = flag[2:].replace("-", "_")
        func = click.option(flag, name, type=kind, default=defaults[name], show_default=True, help=text)(func)
    return device_option(func)


def device_option(func):
    """--device: where torch runs (training, and a corrector's forward pass)."""
    return click.option("--device", default="cpu", show_default=True, help="Torch device: cpu, cuda, …")(func)


def corrector_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    from ..defenses.corrector import LogitCorrector

    return {k: kwargs.pop(k) for k in list(kwargs) if k in LogitCorrector._get_param_names()}


def progress() -> bool:
    """Progress bars only for a person watching (stderr is a terminal), never in logs or CI."""
    return sys.stderr.isatty()


def partition(out: str) -> tuple[str, str] | None:
    """How a table output is laid out: one file for a .parquet name, else a directory partitioned by split and attack."""
    return None if out.endswith(".parquet") else ("split", "attack")


def report_defended(defense: Any, report: dict[str, Any], out: str, *, as_json: bool) -> None:
    """Print what `logitguard.engines.stream.defend_path` reports: flagged and rejected rates per attack, and accuracy
    when the table is labelled and has clean rows."""
    from ..report.evaluation import format_evaluation

    written, flagged, rejected = report["written"], report["flagged_rate"], report["rejected_rate"]
    results = report["evaluation"]
    if as_json:
        echo_json({"written": [str(p) for p in written], "on_flag": defense.on_flag, "flagged_rate": flagged,
                   "rejected_rate": rejected,
                   "evaluation": None if results is None else results.to_dict(orient="records")})
        return
    click.echo("flagged: " + ", ".join(f"{a} {100 * r:.1f}%" for a, r in flagged.items()))
    if defense.on_flag != "correct":
        click.echo("rejected: " + ", ".join(f"{a} {100 * r:.1f}%" for a, r in rejected.items()))
    if results is not None:
        click.echo(format_evaluation(results))
    click.echo(f"wrote {len(written)} file(s) under {out}")

