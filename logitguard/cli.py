"""The `logitguard` command: a thin layer over the library (open input → one library call → print).

Errors about the user's input (`LogitguardError`) are printed as ``Error: …`` with exit status 1 and no
traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from .defenses.detector_kinds import DETECTOR_KINDS
from .errors import LogitguardError


class ErrorReportingGroup(click.Group):
    """A click group that prints LogitguardError and any OSError (a file that cannot be read or written) as
    `Error: …` (exit 1) instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LogitguardError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            from .files import describe_os_error

            raise click.ClickException(describe_os_error(exc)) from None


def claim_output(out: str, force: bool, *, directory: bool | None = None, merge: bool = False,
                 extra: tuple[str, ...] = ()) -> None:
    """Before any work: `out` is writable, no other run is writing it, and it is not overwritten without
    --force (`merge`: a directory the command adds files to). The claim lasts until the command ends.
    `directory` None: a directory unless `out` ends in .parquet."""
    from .files import claim_output as claim

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


def old_spelling(old: str, param: str, new: str, *, type: Any = None, required: bool = False):
    """A hidden option `old`, the earlier spelling of `new` (same meaning, same values), kept working with a
    warning on stderr; its value goes to the command's `param`. Apply it above `new`'s option. `required`:
    one of the two must be given (`new` itself is then declared without ``required``)."""
    legacy = f"legacy_{param}"

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.pop(legacy)
            ctx = click.get_current_context()
            if value is not None:
                if ctx.get_parameter_source(param) == click.core.ParameterSource.COMMANDLINE:
                    raise click.UsageError(f"give {new} only ({old} is its old spelling)")
                click.echo(f"Warning: {old} is deprecated; use {new} (same values)", err=True)
                kwargs[param] = value
            elif required and kwargs.get(param) is None:
                raise click.UsageError(f"Missing option '{new}'.")
            return func(*args, **kwargs)

        return click.option(old, legacy, type=type, default=None, hidden=True,
                            help=f"Deprecated spelling of {new}.")(wrapper)
    return decorate


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


@main.command()
@table_argument
@json_option
def inspect(table: str, as_json: bool) -> None:
    """Summarise a logit table: rows, accuracy and attack success per split x attack."""
    from .engines.stream import summarize_path
    from .report.summary import format_summary

    summary = summarize_path(table)
    if as_json:
        echo_json(summary)
    else:
        click.echo(format_summary(summary))


# -- corrector ---------------------------------------------------------------------------------


corrector_file_option = click.option("--corrector", "corrector_path", required=True,
                                     type=click.Path(dir_okay=False), help="A file written by train-corrector.")


def comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# Mirrors LogitCorrector's defaults (the paper's) without importing it: `--help` stays free of
# scikit-learn and torch. tests/test_light.py checks they agree.
_CORRECTOR_DEFAULTS = {"hidden": 10_000, "p_clean": 0.3, "epochs": 50, "lr": 5e-5, "weight_decay": 1e-4,
                       "batch_size": 256, "dropout": 0.5, "validation_fraction": 0.0, "patience": 5, "seed": 0}


def corrector_options(func):
    """Hyperparameters of `LogitCorrector` (defaults are the paper's), collected into one dict."""
    defaults = _CORRECTOR_DEFAULTS
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


def _corrector_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    from .defenses.corrector import LogitCorrector

    return {k: kwargs.pop(k) for k in list(kwargs) if k in LogitCorrector._get_param_names()}


def _progress() -> bool:
    """Progress bars only for a person watching (stderr is a terminal), never in logs or CI."""
    return sys.stderr.isatty()


@main.command("train-corrector")
@table_argument
@old_spelling("--attack", "attacks", "--attacks", type=comma_list, required=True)
@click.option("--attacks", type=comma_list, default=None, help="Attack(s) to train on: pgd or pgd,mim.  [required]")
@click.option("--split", default="train", show_default=True, help="Split to train on.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Corrector file to write (.npz).")
@click.option("--stream", is_flag=True, help="Stream mini-batches from disk (tables larger than memory).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@corrector_options
@json_option
def train_corrector(table: str, attacks: list[str], split: str, out: str, stream: bool, force: bool,
                    as_json: bool, **kwargs: Any) -> None:
    """Train a logit corrector on clean and attacked logits (Algorithm 1) and save it."""
    from .defenses.corrector import LogitCorrector

    claim_output(out, force, directory=False)  # fail before training, not after
    corrector = LogitCorrector(progress=_progress(), **_corrector_params(kwargs))
    corrector.fit_table(table, attacks, split=split, stream=stream).save(out, overwrite=force)
    last = corrector.history_[-1]
    report = {"out": out, "attacks": attacks, "epochs_run": last["epoch"], "best_epoch": corrector.best_epoch_,
              "final_loss": last["loss"], "history": corrector.history_}
    emit(report, as_json, f"trained on {','.join(attacks)} for {last['epoch']} epochs (kept epoch "
                          f"{corrector.best_epoch_}, final loss {last['loss']:.4f}); wrote {out}")


@main.command()
@table_argument
@corrector_file_option
@click.option("--out", required=True, type=click.Path(),
              help="Output: a .parquet file, or a directory (partitioned by split and attack).")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@device_option
@engine_option
@json_option
def correct(table: str, corrector_path: str, out: str, force: bool, device: str, engine: str, workers: int | None,
            as_json: bool) -> None:
    """Write TABLE with corrected logits and predictions, and summarise it."""
    from .defenses.corrector import LogitCorrector
    from .engines.stream import correct_path
    from .report.summary import format_summary

    claim_output(out, force)
    if scale := on_ray(engine, workers):
        if device != "cpu":
            raise click.UsageError("--device applies to --engine local (Ray actors pick their own devices)")
        written, summary = scale.correct(table, corrector_path, out, overwrite=force, workers=workers)
    else:
        corrector = LogitCorrector.load(corrector_path, device=device)
        written, summary = correct_path(corrector, table, out, partition_by=_partition(out), overwrite=force)
    if as_json:
        echo_json({"written": [str(p) for p in written], "summary": summary})
    else:
        click.echo(format_summary(summary))
        click.echo(f"\nwrote {len(written)} file(s) under {out}")


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
    from .defenses.corrector import LogitCorrector
    from .evaluation.evaluate import format_evaluation
    from .engines.stream import evaluate_path

    corrector = LogitCorrector.load(corrector_path, device=device)
    results = evaluate_path(table, {"corrector": corrector}, split=split, attacks=attacks)
    if as_json:
        echo_json(results.to_dict(orient="records"))
    else:
        click.echo(format_evaluation(results))


@main.command()
@table_argument
@click.option("--attacks", type=comma_list, default=None, help="Attacks to train on and evaluate (default: all).")
@click.option("--train-split", default="train", show_default=True)
@click.option("--split", default="test", show_default=True, help="Split to evaluate on.")
@corrector_options
@json_option
def transfer(table: str, attacks: list[str] | None, train_split: str, split: str, as_json: bool,
             **kwargs: Any) -> None:
    """Transfer matrix: one corrector per attack, each evaluated on every attack (seed Table 3)."""
    from .evaluation.evaluate import train_per_attack, transfer_matrix
    from .report.summary import percent
    from .tables import CLEAN, read_table

    data = read_table(table, columns=[])
    attacks = attacks or [a for a in data.attacks if a != CLEAN]
    correctors = train_per_attack(data, attacks, split=train_split, progress=_progress(),
                                  **_corrector_params(kwargs))
    matrix = transfer_matrix(data, correctors, split=split, attacks=attacks)
    if as_json:
        echo_json(matrix.to_dict(orient="index"))
    else:
        click.echo("accuracy after correction; rows: evaluated on, columns: trained on")
        click.echo(matrix.map(percent).to_string())


@main.command("sweep-p-clean")
@table_argument
@old_spelling("--attack", "attacks", "--attacks", type=comma_list, required=True)
@click.option("--attacks", type=comma_list, default=None, help="Attack(s) to train on.  [required]")
@click.option("--values", type=comma_list, default="0,0.1,0.3,0.5,0.7,0.9", show_default=True,
              help="p_clean values to try.")
@click.option("--train-split", default="train", show_default=True)
@click.option("--split", default="test", show_default=True, help="Split to evaluate on.")
@corrector_options
@json_option
def sweep_p_clean(table: str, attacks: list[str], values: list[str], train_split: str, split: str,
                  as_json: bool, **kwargs: Any) -> None:
    """Clean-vs-robust trade-off: one corrector per p_clean value."""
    from .evaluation.evaluate import sweep_p_clean as sweep
    from .report.summary import percent
    from .tables import read_table

    params = _corrector_params(kwargs)
    params.pop("p_clean")
    try:
        grid = [float(v) for v in values]
    except ValueError:
        raise click.BadParameter(f"expected numbers, got {','.join(values)}", param_hint="--values") from None
    if not grid:
        raise click.BadParameter("give at least one p_clean value, e.g. 0,0.5", param_hint="--values")
    results = sweep(read_table(table, columns=[]), attacks, grid, train_split=train_split, eval_split=split,
                    progress=_progress(), **params)
    if as_json:
        echo_json(results.reset_index().to_dict(orient="records"))
    else:
        click.echo(results.map(percent).to_string())


# -- detectors ---------------------------------------------------------------------------------


# Detector parameters the command exposes (beyond --fpr), as (flag, parameter, type, help). Which kinds take
# which is read from the classes at run time; a flag the chosen kind does not take is an Error. Defaults are
# the classes' own (not repeated here, so `--help` imports no detector).
_DETECTOR_OPTIONS = [
    ("--correction", "correction", click.Choice(["argmax", "logistic", "reference"]),
     "odds, odds-single: how flagged rows are corrected (default argmax; reference: Roth et al.'s classifier)."),
    ("--thresholds", "thresholds", click.Choice(["global", "pair"]),
     "odds, odds-single: one cutoff for every class pair, or per-pair clean quantiles (default global)."),
    ("--aggregation", "aggregation", click.Choice(["query", "per-kind", "mean"]),
     "odds, odds-single: how the noise queries are z-scored (default query; docs/detectors.md)."),
    ("--min-rows", "min_rows", int, "odds, odds-single: classes with fewer rows borrow pooled statistics (default 10)."),
    ("--sigma2", "sigma2", float,
     "kdensity: the Gaussian kernel's bandwidth sigma^2 (default 1/0.26, Pang et al.'s for CE networks)."),
    ("--max-per-class", "max_per_class", int, "kdensity: clean training rows kept per class (default 1000)."),
    ("--hidden", "hidden", int, "learned, learned-noisy: hidden width of the MLP (default 64)."),
    ("--max-iter", "max_iter", int, "learned, learned-noisy: most MLP training iterations (default 200)."),
    ("--c", "C", float, "insen: inverse L2 strength of the logistic regression (default 1.0)."),
    ("--seed", "seed", int, "learned, learned-noisy, kdensity: seed of the MLP / the per-class sample (default 0)."),
]


def detector_options(func):
    for flag, name, kind, text in reversed(_DETECTOR_OPTIONS):
        func = click.option(flag, f"opt_{name}", type=kind, default=None, help=text)(func)
    return func


def _detector_params(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """The detector's parameters from the given fit-detector options; an option `kind` does not take is refused."""
    from .defenses.estimator import REGISTRY

    takes = set(REGISTRY[kind]._get_param_names())
    params = {}
    for flag, name, _, _ in _DETECTOR_OPTIONS:
        value = given.pop(f"opt_{name}")
        if value is None:
            continue
        if name not in takes:
            accepted = [f for f, n, _, _ in _DETECTOR_OPTIONS if n in takes]
            raise LogitguardError(f"{flag} does not apply to --kind {kind} (it takes "
                                  f"{', '.join(['--fpr', *accepted])})")
        params[name] = value
    return params


@main.command("fit-detector")
@table_argument
@click.option("--kind", required=True, type=click.Choice(DETECTOR_KINDS), help="Which detector.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Detector file to write (.npz).")
@click.option("--fpr", type=float, default=0.05, show_default=True, help="Target false-positive rate on clean rows.")
@click.option("--attacks", type=comma_list, default=None,
              help="Attacks a supervised detector (learned, insen, odds with reference correction) learns from, "
                   "and the odds test's logistic rule (default: all).")
@click.option("--split", default="train", show_default=True, help="Split to fit on.")
@detector_options
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@json_option
def fit_detector(table: str, kind: str, out: str, fpr: float, attacks: list[str] | None, split: str, force: bool,
                 as_json: bool, **options: Any) -> None:
    """Fit a detector and calibrate its threshold on clean rows to the target FPR.

    Each kind takes --fpr and the options that name it; every other parameter of a detector is fixed at
    its default (docs/detectors.md). kdensity reads the table's features column and insen its insen column."""
    from .defenses.detectors import make_detector

    params = {"fpr": fpr, **_detector_params(kind, options)}  # refused before claiming --out or reading the table
    detector = make_detector(kind, **params)
    claim_output(out, force, directory=False)
    detector.fit_path(table, attacks=attacks, split=split).save(out, overwrite=force)
    report = {"out": out, "kind": kind, "params": detector.get_params(), "threshold": detector.threshold_,
              "achieved_fpr": detector.achieved_fpr_}
    emit(report, as_json, f"fitted {kind}: threshold {detector.threshold_:.4g} flags "
                          f"{100 * detector.achieved_fpr_:.1f}% of calibration clean rows "
                          f"(target {100 * fpr:.1f}%); wrote {out}")


@main.command()
@table_argument
@click.option("--detector", "detector_path", required=True, type=click.Path(dir_okay=False),
              help="A file written by fit-detector.")
@click.option("--split", default="test", show_default=True, help="Split to score.")
@engine_option
@json_option
def detect(table: str, detector_path: str, split: str, engine: str, workers: int | None, as_json: bool) -> None:
    """Flag rows; with labels and clean rows, also report AUROC and TPR at 1% and 5% FPR per attack."""
    from .defenses.detectors import load_detector
    from .evaluation.evaluate import format_detection
    from .engines.stream import detect_path

    if scale := on_ray(engine, workers):
        report = scale.detect(table, detector_path, split, workers=workers)
    else:
        report = detect_path(load_detector(detector_path), table, split=split)
    rates, metrics = report["flagged_rate"], report["metrics"]
    if as_json:
        from .evaluation.threat import to_records

        echo_json({"flagged_rate": rates, "metrics": None if metrics is None else to_records(metrics)})
        return
    click.echo("flagged: " + ", ".join(f"{a} {100 * r:.1f}%" for a, r in rates.items()))
    if metrics is not None:
        click.echo(format_detection(metrics))


@main.command("train-svm")
@table_argument
@old_spelling("--attack", "attacks", "--attacks", type=comma_list)
@click.option("--attacks", type=comma_list, default="fgsm", show_default=True,
              help="Attack(s) whose logits train the SVM.")
@click.option("--split", default="train", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="SVM file to write (.npz).")
@click.option("--c", "c_value", type=float, default=1.0, show_default=True, help="SVM regularisation C.")
@click.option("--method", type=click.Choice(["auto", "exact", "nystroem"]), default="auto", show_default=True,
              help="exact: one-vs-one SVC (tens of classes); nystroem: approximate RBF least-squares SVM, "
                   "one-vs-rest (hundreds to thousands of classes); auto: exact up to 50 classes.")
@click.option("--landmarks", type=int, default=1000, show_default=True, help="Nyström landmarks (nystroem).")
@click.option("--max-rows", type=int, default=None,
              help="Cap on training rows (default: 20000 for exact, 200000 for nystroem).")
@click.option("--gamma", default="scale", show_default=True,
              help="RBF kernel width: scale, auto (scikit-learn's rules) or a number > 0.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the row sample (above --max-rows) and of the Nystroem landmarks.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@json_option
def train_svm(table: str, attacks: list[str], split: str, out: str, c_value: float, method: str, landmarks: int,
              max_rows: int | None, gamma: str, seed: int, force: bool, as_json: bool) -> None:
    """Train the SVM corrector on attacked logits (FGSM by default) and save it."""
    from .defenses.svm import SVMCorrector
    from .tables import read_table

    if gamma not in ("scale", "auto"):
        try:
            gamma = float(gamma)
        except ValueError:
            raise click.BadParameter(f"expected scale, auto or a number, got {gamma!r}", param_hint="--gamma") from None
    claim_output(out, force, directory=False)
    svm = SVMCorrector(C=c_value, gamma=gamma, method=method, landmarks=landmarks, max_rows=max_rows,
                       seed=seed).fit_table(
        read_table(table, split=split, columns=[]), attacks, split=None)
    svm.save(out, overwrite=force)
    vectors = "landmarks" if svm.method_ == "nystroem" else "support vectors"
    report = {"out": out, "attacks": attacks, "method": svm.method_, "support_vectors": int(len(svm.support_vectors_))}
    emit(report, as_json, f"trained on {','.join(attacks)} ({svm.method_}): {report['support_vectors']} {vectors}; "
                          f"wrote {out}")


@main.command()
@table_argument
@click.option("--detector", "detector_path", required=True, type=click.Path(dir_okay=False),
              help="A file written by fit-detector.")
@click.option("--corrector", "corrector_path", default=None, type=click.Path(dir_okay=False),
              help="A corrector (train-corrector), an SVM (train-svm) or an odds detector (its own correction); "
                   "not needed with --on-flag reject.")
@click.option("--on-flag", type=click.Choice(["correct", "reject", "agree"]), default="correct", show_default=True,
              help="What a flagged row gets: the corrector's label, no label (abstain, pred null), or the model's "
                   "label only when the corrector agrees (else abstain).")
@click.option("--out", required=True, type=click.Path(),
              help="Output: a .parquet file, or a directory (partitioned by split and attack).")
@click.option("--split", default=None, help="Only this split (default: all).")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@engine_option
@json_option
def defend(table: str, detector_path: str, corrector_path: str | None, on_flag: str, out: str, split: str | None,
           force: bool, engine: str, workers: int | None, as_json: bool) -> None:
    """Detect, then correct, reject or keep-on-agreement flagged rows; write pred and flagged, and report
    accuracy when labelled (pred is null where a row is rejected)."""
    from .defenses.gated import GatedDefense, load_corrector
    from .defenses.detectors import load_detector
    from .engines.stream import defend_path

    claim_output(out, force)
    if scale := on_ray(engine, workers):
        spec = scale.DefenseSpec("defense", detector_path, corrector_path, on_flag)
        defense, report = scale.defend(table, spec, out, split=split, overwrite=force, workers=workers)
    else:
        corrector = None if corrector_path is None else load_corrector(corrector_path)
        defense = GatedDefense(load_detector(detector_path), corrector, on_flag=on_flag)
        report = defend_path(defense, table, out, split=split, partition_by=_partition(out), overwrite=force)
    _report_defended(defense, report, out, as_json=as_json)


def _partition(out: str) -> tuple[str, str] | None:
    """How a table output is laid out: one file for a .parquet name, else a directory partitioned by split and attack."""
    return None if out.endswith(".parquet") else ("split", "attack")


def _report_defended(defense: Any, report: dict[str, Any], out: str, *, as_json: bool) -> None:
    """Print what `logitguard.engines.stream.defend_path` reports: flagged and rejected rates per attack, and accuracy
    when the table is labelled and has clean rows."""
    from .evaluation.evaluate import format_evaluation

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


@main.command("fit-pipelines")
@table_argument
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for the defense files and their manifest, defenses.json.")
@click.option("--attacks", type=comma_list, default=None,
              help="Attacked rows the supervised detectors learn from (default: all).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing files in --out.")
@json_option
def fit_pipelines(table: str, out: str, attacks: list[str] | None, seed: int, force: bool, as_json: bool) -> None:
    """Fit the shipped pipelines (logitguard.defenses.shipped) on the train split and write them with a manifest."""
    from .defenses.pipelines import load_pipelines
    from .defenses.shipped import fit_shipped
    from .tables import read_table

    claim_output(out, force, directory=True, merge=True)
    manifest = fit_shipped(read_table(table, split="train"), out, seed=seed, overwrite=force, attacks=attacks)
    parts = {name: {"detector": spec.detector and spec.detector.name, "corrector": spec.corrector and spec.corrector.name,
                    "on_flag": spec.on_flag} for name, spec in load_pipelines(manifest).items()}
    emit({"manifest": str(manifest), "pipelines": parts}, as_json, "\n".join(
        [f"wrote {manifest}:"] + [f"  {name}: " + ", ".join(f"{k} {v or '-'}" for k, v in p.items())
                                  for name, p in parts.items()]))


@main.command()
@table_argument
@click.option("--defenses", "manifest", required=True, type=click.Path(dir_okay=False),
              help="A pipeline manifest (defenses.json): named detector / corrector / on_flag pipelines.")
@old_spelling("--budget", "budgets", "--budgets")
@click.option("--budgets", default="8/255,16/255", show_default=True,
              help="L-inf budgets, comma-separated numbers or fractions.")
@click.option("--split", default="test", show_default=True, help="Split to evaluate on.")
@click.option("--reference", type=click.Path(dir_okay=False), default=None,
              help="A compare-models result (robust accuracy of the project's classifiers) for Tramèr's eps/2 "
                   "check  [default: models/comparison.json beside TABLE, when present]")
@json_option
def threat(table: str, manifest: str, budgets: str, split: str, reference: str | None, as_json: bool) -> None:
    """Robust accuracy per threat model (per-sample worst case, every figure with its 95% interval) for every
    pipeline, the share of successful attacks each detector misses, Tramèr's eps/2 check, the
    attack-failure indicators and what a query attacker gets from scores (docs/threat-models.md)."""
    from .defenses.pipelines import load_pipelines
    from .evaluation.access import format_query_access, query_access_table
    from .evaluation.checks import (attack_failure_indicators, format_indicators, format_tramer, load_reference,
                                    tramer_check)
    from .tables import CLEAN, read_table
    from .evaluation.threat import (detector_miss_table, format_detector_misses, format_threat_models, threat_model_table, to_records)
    from .tables.threat import parse_budgets

    eps = parse_budgets(budgets)
    specs = load_pipelines(manifest)
    if reference is None:
        reference = str(Path(table).resolve().parent / "models" / "comparison.json")
    elif not Path(reference).is_file():
        raise LogitguardError(f"no such file: {reference}")
    data = read_table(table, split=split)
    pipelines = {name: spec.build() for name, spec in specs.items()}
    detectors = {name: p.detector for name, p in pipelines.items() if p.detector is not None}
    results = threat_model_table(data, pipelines, budgets=eps, split=None)
    misses = detector_miss_table(data, detectors, budgets=eps, split=None)
    clean = data.select(attacks=CLEAN)
    base = float((clean.logits.argmax(axis=1) == clean.labels).mean())
    tramer = tramer_check(results, load_reference(reference), gated=list(detectors), base_accuracy=base)
    indicators = attack_failure_indicators(data, pipelines, budgets=eps, split=None)
    access = query_access_table(data, pipelines, budgets=eps, split=None)
    emit({"threat_models": to_records(results), "detector_misses": to_records(misses),
          "tramer": to_records(tramer), "indicators": to_records(indicators), "query_access": to_records(access)},
         as_json, "\n\n".join([format_threat_models(results), format_detector_misses(misses), format_tramer(tramer),
                                format_indicators(indicators), format_query_access(access)]))


@main.command("compare-models")
@click.argument("models", nargs=-1, required=True)
@click.option("--pipeline", default="ln-reject", show_default=True,
              help="The logit pipeline (a name in each model's manifest) measured beside each bare model.")
@old_spelling("--budget", "budgets", "--budgets")
@click.option("--budgets", default="8/255,16/255", show_default=True,
              help="L-inf budgets, comma-separated numbers or fractions.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="JSON file for the results (the demo reads data/models/comparison.json).")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@json_option
def compare_models(models: tuple[str, ...], pipeline: str, budgets: str, out: str, force: bool,
                   as_json: bool) -> None:
    """Model-side defenses beside a logit pipeline: MODELS are NAME=TABLE:MANIFEST, one per trained model
    (docs/model-side.md). Robust accuracy per threat model with and without the pipeline, detector AUROCs."""
    from .files import atomic_output
    from .evaluation.modelside import compare_models as compare, format_model_side, parse_model_specs
    from .tables.threat import parse_budgets

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
    from .evaluation.curves import FILES, curve_path, format_curves, load_defenses, write_curves

    claim_output(out, force, directory=True, merge=True, extra=tuple(str(Path(out) / f) for f in FILES))
    result = curve_path(table, load_defenses(defenses), sweeps=list(sweeps) or None, split=split, x=x_axis)
    written = write_curves(result, out, overwrite=force)
    emit({**result, **written}, as_json, "\n".join(
        [format_curves(result), "", f"wrote {', '.join(written['files'])}"]
        + ([f"curve.png {written['plot']}"] if written["plot"] else [])))


# -- guard -------------------------------------------------------------------------------------


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
@click.option("--budgets", default="8/255,16/255", show_default=True, help="L-inf budgets for the threat figures.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing guard file.")
@json_option
def guard_fit(table: str, out: str, detector: str | None, corrector: str | None, on_flag: str, fpr: float,
              attacks: list[str] | None, pipeline: str | None, budgets: str, seed: int, force: bool,
              as_json: bool) -> None:
    """Fit a guard on the train split of TABLE, measure it per threat model on the test split, save it."""
    from .defenses.guard import Guard, format_info
    from .tables.threat import parse_budgets

    claim_output(out, force, directory=False)
    eps = parse_budgets(budgets)
    if pipeline is not None:
        manifest, sep, name = pipeline.rpartition(":")
        if not sep or not manifest or not name:
            raise LogitguardError(f"--from-pipeline takes MANIFEST:NAME, got {pipeline!r}")
        fitted = Guard.from_pipeline(manifest, name, table, budgets=eps)
    else:
        fitted = Guard.fit(table, detector=None if detector == "none" else detector, corrector=corrector,
                           on_flag=on_flag, fpr=fpr, attacks=attacks, seed=seed, budgets=eps)
    fitted.save(out, overwrite=force)
    emit({"out": out, **fitted.info()}, as_json, f"wrote {out}\n\n" + format_info(fitted.info()))


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
    from .defenses.guard import Guard
    from .engines.stream import defend_path

    claim_output(out, force)
    if scale := on_ray(engine, workers):
        defense, report = scale.defend(table, scale.DefenseSpec("guard", guard_path), out, split=split,
                                       overwrite=force, workers=workers)
    else:
        loaded = Guard.load(guard_path)
        defense, report = loaded.defense, defend_path(loaded, table, out, split=split, partition_by=_partition(out),
                                                      overwrite=force)
    _report_defended(defense, report, out, as_json=as_json)


@guard.command("info")
@click.argument("guard_path", metavar="GUARD", type=click.Path(dir_okay=False))
@json_option
def guard_info(guard_path: str, as_json: bool) -> None:
    """Describe a guard: expected input, policy, threshold, threat-model figures, provenance."""
    from .defenses.guard import Guard, format_info

    info = Guard.load(guard_path).info()
    emit(info, as_json, format_info(info))


# -- explain and demo --------------------------------------------------------------------------


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
    from . import explain as ex
    from .defenses.corrector import LogitCorrector

    if top < 1:
        raise click.BadParameter(f"must be at least 1, got {top}", param_hint="--top")
    corrector = LogitCorrector.load(corrector_path, device=device)
    freqs, ablations = ex.explain_path(corrector, table, attacks, split=split, k=k)
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
    from .report.demo import run_demo

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
    checkout = Path(__file__).resolve().parents[1]
    for candidate in (DEMO_DATA, checkout / DEMO_DATA):
        if candidate.exists():
            return candidate
    raise LogitguardError(f"no logit table at {DEMO_DATA} (the default) here or in {checkout}; pass --data PATH "
                          f"(a table from `logitguard-produce export`)")


# -- serve -------------------------------------------------------------------------------------

from .serve import DEFAULT_DRIFT_WINDOW, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_ROWS  # noqa: E402 (imports nothing else)

# What the 'serve' extra installs: an ImportError naming one of these means the extra is missing.
_SERVE_MODULES = {"fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client"}


@main.command()
@click.argument("guard", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback by default: the service has no authentication of its own.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-rows", type=click.IntRange(min=1), default=DEFAULT_MAX_ROWS, show_default=True,
              help="Rows per request (more: 422).")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MAX_BODY_BYTES / 2**20,
              show_default=True, help="Request body limit in MiB (more: 413).")
@click.option("--drift-window", type=click.IntRange(min=1), default=DEFAULT_DRIFT_WINDOW, show_default=True,
              help="Recent rows whose flagged rate is tested against the detector's calibrated FPR.")
def serve(guard: str, host: str, port: int, max_rows: int, max_body_mb: float, drift_window: int) -> None:
    """Serve GUARD (a guard file) over HTTP: POST /v1/check (JSON), /v1/check.arrow (Arrow IPC stream);
    GET /v1/health, /v1/info, /metrics, /openapi.json."""
    try:
        from .serve import is_loopback, run
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in _SERVE_MODULES:
            raise LogitguardError("the service needs the 'serve' extra: pip install 'logitguard[serve]' "
                                  f"({exc.name} is missing)") from None
        raise
    from .defenses.guard import Guard

    loaded = Guard.load(guard)
    if not is_loopback(host):
        click.echo(f"warning: binding to {host} lets other machines reach this service, which has no "
                   "authentication; put it behind a proxy that authenticates, or bind to 127.0.0.1", err=True)
    run(loaded, host=host, port=port, max_rows=max_rows, max_body_bytes=max(1, int(max_body_mb * 2**20)),
        drift_window=drift_window)
