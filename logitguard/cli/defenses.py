"""Commands that fit and apply defenses: correctors (`train-corrector`, `correct`, `train-svm`), detectors
(`fit-detector`, `detect`), gated defenses (`defend`) and the shipped pipelines (`fit-pipelines`).
"""

from __future__ import annotations

from typing import Any

import click

from ..defenses.detector_kinds import DETECTOR_KINDS
from ..errors import LogitguardError
from .options import (claim_output, comma_list, corrector_file_option, corrector_options, corrector_params,
                      device_option, echo_json, emit, engine_option, json_option, main, on_ray, partition, progress,
                      report_defended, table_argument)


@main.command("train-corrector")
@table_argument
@click.option("--attacks", type=comma_list, required=True, help="Attack(s) to train on: pgd or pgd,mim.")
@click.option("--split", default="train", show_default=True, help="Split to train on.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Corrector file to write (.npz).")
@click.option("--stream", is_flag=True, help="Stream mini-batches from disk (tables larger than memory).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@corrector_options
@json_option
def train_corrector(table: str, attacks: list[str], split: str, out: str, stream: bool, force: bool,
                    as_json: bool, **kwargs: Any) -> None:
    """Train a logit corrector on clean and attacked logits (Algorithm 1) and save it."""
    from ..defenses.corrector import LogitCorrector
    from ..tables import TableSource

    claim_output(out, force, directory=False)  # fail before training, not after
    corrector = LogitCorrector(progress=progress(), **corrector_params(kwargs))
    corrector.fit_table(TableSource(table, split=split), attacks, stream=stream).save(out, overwrite=force)
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
    from ..defenses.corrector import LogitCorrector
    from ..engines.stream import correct_path
    from ..report.summary import format_summary

    claim_output(out, force)
    if scale := on_ray(engine, workers):
        if device != "cpu":
            raise click.UsageError("--device applies to --engine local (Ray actors pick their own devices)")
        written, summary = scale.correct(table, corrector_path, out, overwrite=force, workers=workers)
    else:
        corrector = LogitCorrector.load(corrector_path, device=device)
        written, summary = correct_path(corrector, table, out, partition_by=partition(out), overwrite=force)
    if as_json:
        echo_json({"written": [str(p) for p in written], "summary": summary})
    else:
        click.echo(format_summary(summary))
        click.echo(f"\nwrote {len(written)} file(s) under {out}")

# -- detectors ---------------------------------------------------------------------------------


# Detector parameters the command exposes (beyond --fpr), as (flag, parameter, type, help). Which kinds take
# which is read from the classes at run time; a flag the chosen kind does not take is an Error. Defaults are
# the classes' own (not repeated here, so `--help` imports no detector).
DETECTOR_OPTIONS = [
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
    ("--hidden", "hidden", int, "learned, learned-noisy, learned-ranked: hidden width of the MLP (default 64)."),
    ("--max-iter", "max_iter", int,
     "learned, learned-noisy, learned-ranked: most MLP training iterations (default 200)."),
    ("--c", "C", float, "insen: inverse L2 strength of the logistic regression (default 1.0)."),
    ("--seed", "seed", int,
     "learned, learned-noisy, learned-ranked, kdensity: seed of the MLP / the per-class sample (default 0)."),
]


def detector_options(func):
    for flag, name, kind, text in reversed(DETECTOR_OPTIONS):
        func = click.option(flag, f"opt_{name}", type=kind, default=None, help=text)(func)
    return func


def _detector_params(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """The detector's parameters from the given fit-detector options; an option `kind` does not take is refused."""
    from ..defenses.estimator import REGISTRY

    takes = set(REGISTRY[kind]._get_param_names())
    params = {}
    for flag, name, _, _ in DETECTOR_OPTIONS:
        value = given.pop(f"opt_{name}")
        if value is None:
            continue
        if name not in takes:
            accepted = [f for f, n, _, _ in DETECTOR_OPTIONS if n in takes]
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
    from ..defenses.detectors import make_detector
    from ..tables import TableSource

    params = {"fpr": fpr, **_detector_params(kind, options)}  # refused before claiming --out or reading the table
    detector = make_detector(kind, **params)
    claim_output(out, force, directory=False)
    detector.fit_path(TableSource(table, split=split), attacks=attacks).save(out, overwrite=force)
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
    from ..defenses.detectors import load_detector
    from ..report.evaluation import format_detection
    from ..engines.stream import detect_path
    from ..tables import TableSource

    source = TableSource(table, split=split)
    if scale := on_ray(engine, workers):
        report = scale.detect(source, detector_path, workers=workers)
    else:
        report = detect_path(load_detector(detector_path), source)
    rates, metrics = report["flagged_rate"], report["metrics"]
    if as_json:
        from ..evaluation.threat import to_records

        echo_json({"flagged_rate": rates, "metrics": None if metrics is None else to_records(metrics)})
        return
    click.echo("flagged: " + ", ".join(f"{a} {100 * r:.1f}%" for a, r in rates.items()))
    if metrics is not None:
        click.echo(format_detection(metrics))


@main.command("train-svm")
@table_argument
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
    from ..defenses.svm import SVMCorrector
    from ..tables import TableSource, read_table

    if gamma not in ("scale", "auto"):
        try:
            gamma = float(gamma)
        except ValueError:
            raise click.BadParameter(f"expected scale, auto or a number, got {gamma!r}", param_hint="--gamma") from None
    claim_output(out, force, directory=False)
    svm = SVMCorrector(C=c_value, gamma=gamma, method=method, landmarks=landmarks, max_rows=max_rows,
                       seed=seed).fit_table(read_table(TableSource(table, split=split), columns=[]), attacks)
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
    from ..defenses.gated import GatedDefense, load_corrector
    from ..defenses.detectors import load_detector
    from ..engines.stream import defend_path
    from ..tables import TableSource

    claim_output(out, force)
    source = TableSource(table, split=split)
    if scale := on_ray(engine, workers):
        spec = scale.DefenseSpec("defense", detector_path, corrector_path, on_flag)
        defense, report = scale.defend(source, spec, out, overwrite=force, workers=workers)
    else:
        corrector = None if corrector_path is None else load_corrector(corrector_path)
        defense = GatedDefense(load_detector(detector_path), corrector, on_flag=on_flag)
        report = defend_path(defense, source, out, partition_by=partition(out), overwrite=force)
    report_defended(defense, report, out, as_json=as_json)

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
    from ..defenses.pipelines import load_pipelines
    from ..defenses.shipped import fit_shipped
    from ..tables import read_table

    claim_output(out, force, directory=True, merge=True)
    manifest = fit_shipped(read_table(table, split="train"), out, seed=seed, overwrite=force, attacks=attacks)
    parts = {name: {"detector": spec.detector and spec.detector.name, "corrector": spec.corrector and spec.corrector.name,
                    "on_flag": spec.on_flag} for name, spec in load_pipelines(manifest).items()}
    emit({"manifest": str(manifest), "pipelines": parts}, as_json, "\n".join(
        [f"wrote {manifest}:"] + [f"  {name}: " + ", ".join(f"{k} {v or '-'}" for k, v in p.items())
                                  for name, p in parts.items()]))
