"""The main job: every analysis on one logit table, written up as a Markdown report with PNG figures.

The report opens with a plain-language summary (`logitguard.report.threats`); every section ends with the
seed papers' published figures (`logitguard.report.published`), quoted with their setting beside ours.

`run_demo` inspects the table, trains correctors and detectors, evaluates them (seed Tables 1–3, the
p_clean trade-off, detector × attack, gated pipelines), explains the correctors (supporting classes,
ablation, Bhattacharyya similarity beside measured transfer) and writes ``report.md`` (its text:
`logitguard.report.demo_text`) plus figures.
The demo trains smaller correctors than the paper's (`DEMO_CORRECTOR`) so that it finishes in a few
minutes on two CPU cores; the report says so and docs/corrector.md gives the paper-default figures.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..files import atomic_output, refuse_overwrite, staged_output
from ..errors import LogitguardError
from ..defenses.decision import successful_attack
from ..defenses.shipped import MANIFEST
from ..tables import CLEAN, LogitTable, pair, read_table
from ..evaluation.threat import to_records
from ..tables.threat import threat_of
from .demo_text import DEMO_CORRECTOR, THREAT_FIGURE, render_report
from .published import load_reference
from .summary import summarize

P_CLEAN_VALUES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
FIGURES = ("supporting_classes.png", "transfer.png", "bhattacharyya.png", "roc_pgd.png", "mean_logit.png")


def run_demo(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
    plots: bool = True,
    defenses: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run every analysis on the table at `data` and write ``report.md``, ``summary.json`` and figures to `out`.

    `defenses` is the manifest of saved pipelines whose threat-model figures open the report (default:
    ``defenses/defenses.json`` beside `data`; skipped with a note when absent). `log` receives one line
    per step (progress). `reference` is the seeds' published figures (``seed-figures.json`` or its folder;
    default: ``shared/reference`` above the checkout, `logitguard.report.published.find_reference`). Returns
    the summary written to ``summary.json``. Refuses to replace an existing report unless `overwrite`. The files are written beside `out` and added to it in one step at the end.
    """
    out = Path(out)
    targets = [out / "report.md", out / "summary.json", *(out / f for f in (*FIGURES, THREAT_FIGURE) if plots)]
    refuse_overwrite(targets, overwrite)
    with staged_output(out, overwrite=overwrite) as stage:
        return _run_demo(data, out, stage, log=log, plots=plots, defenses=defenses, reference=reference)


def _run_demo(data: str | os.PathLike, out: Path, stage: Path, *, log: Callable[[str], None], plots: bool,
              defenses: str | os.PathLike | None, reference: str | os.PathLike | None) -> dict[str, Any]:
    """`run_demo`, writing into the staging directory `stage` (`out` names the result in messages)."""
    from .. import explain
    from ..defenses.gated import GatedDefense
    from ..defenses.detectors import LOGIT_KINDS, make_detector
    from ..evaluation.evaluate import detection_table, evaluate, sweep_p_clean, train_per_attack, transfer_matrix
    from ..defenses.svm import SVMCorrector

    start = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str) -> None:
        timings[name] = time.perf_counter() - start
        log(f"[{timings[name]:6.1f}s] {name}")

    step("reading the table")
    full = read_table(data)
    _check_demo_table(full, data)
    # Sections 1-7 are per attack and need every attack in both splits: the oblivious attacks of the
    # train split. Test-only partitions (other budgets, transfer, surrogate, adaptive) feed the threat models.
    attacks = [a for a in full.select(split="train").attacks
               if a != CLEAN and threat_of(full.metadata, a)["model"] == "oblivious"]
    table = full.select(attacks=[CLEAN, *attacks])
    train, test = table.select(split="train"), table.select(split="test")  # fits on train, figures on test
    summary: dict[str, Any] = {"data": str(data), "table": summarize(test)}
    seeds = load_reference(reference)
    summary["reference"] = seeds.get("_path")

    step("threat models (saved pipelines)")
    manifest = defenses if defenses is not None else Path(data).parent / "defenses" / MANIFEST
    threat = _threat_models(full.select(split="test"), manifest)
    if threat is not None:
        summary["threat_models"] = to_records(threat)

    model_side = _model_side(Path(data).parent / "models", stage)
    if model_side is not None:
        summary["model_side"] = model_side["results"]

    step(f"training one corrector per attack ({', '.join(attacks)})")
    correctors = train_per_attack(train, attacks, progress=False, **DEMO_CORRECTOR)
    main_attack = "pgd" if "pgd" in attacks else attacks[0]
    accuracy = evaluate(test, {f"corrector({main_attack})": correctors[main_attack]})
    transfer = transfer_matrix(test, correctors)

    step(f"p_clean sweep on {main_attack}")
    sweep = sweep_p_clean(train, test, main_attack, P_CLEAN_VALUES, progress=False, **DEMO_CORRECTOR)

    # The logits-only detectors (kdensity and insen read other columns: section 8 compares them).
    step("fitting detectors (" + ", ".join(LOGIT_KINDS) + ")")
    has_noise = table.noisy_logits is not None
    detectors = {kind: make_detector(kind).fit_table(train) for kind in LOGIT_KINDS
                 if has_noise or not make_detector(kind).needs_noise}
    detection = detection_table(test, detectors)

    step("gated pipelines")
    svm = SVMCorrector().fit_table(train, "fgsm" if "fgsm" in attacks else main_attack)
    pipelines: dict[str, Any] = {f"corrector({main_attack}) alone": correctors[main_attack], "SVM alone": svm,
                                 "msp@5% → SVM": GatedDefense(detectors["msp"], svm)}
    if has_noise:
        odds_logistic = make_detector("odds", correction="logistic").fit_table(train)
        strict = detectors["learned-noisy"].with_fpr(0.01)
        pipelines |= {
            "odds@5% → SVM": GatedDefense(detectors["odds"], svm),
            "odds@5% → odds-logistic": GatedDefense(odds_logistic, odds_logistic),
            f"learned-noisy@1% → corrector({main_attack})": GatedDefense(strict, correctors[main_attack]),
            "learned-noisy@1% → odds-logistic": GatedDefense(strict, odds_logistic),
        }
    gated = evaluate(test, pipelines)

    step("supporting classes, ablation and Bhattacharyya similarity")
    freqs = pd.concat([explain.supporting_frequencies(correctors[a], test, a) for a in attacks], axis=1)
    bc = explain.bhattacharyya_matrix(freqs)
    agreement = {name: _safe(lambda r=relative: explain.rank_agreement(bc, transfer, relative=r))
                 for name, relative in (("absolute", False), ("relative", True))}
    ablations = pd.DataFrame([explain.ablation(correctors[a], test, a) for a in attacks]).set_index("attack")
    example = pair(test, main_attack).attacked
    row = int(np.flatnonzero(example.logits.argmax(1) != example.labels)[0])
    instance = explain.instance_view(correctors[main_attack], example.logits[row], int(example.labels[row]))
    histogram = explain.mean_logit_counts(test)

    figures: list[str] = []
    if plots:
        step("figures")
        figures = _figures(stage, freqs, transfer, bc, table, detectors, main_attack, histogram, threat)

    step("writing the report")
    summary |= {
        "demo_corrector": DEMO_CORRECTOR,
        "accuracy": accuracy.to_dict(orient="records"),
        "transfer": transfer.to_dict(orient="index"),
        "p_clean_sweep": sweep.reset_index().to_dict(orient="records"),
        "detection": detection.to_dict(orient="records"),
        "gated": gated.to_dict(orient="records"),
        "supporting_top3": explain.top_classes_per_attack(freqs, 3),
        "bhattacharyya": bc.to_dict(orient="index"),
        "rank_agreement": agreement,
        "ablation": ablations.reset_index().to_dict(orient="records"),
        "figures": figures,
    }
    report = render_report(table, data, summary, accuracy, transfer, sweep, detection, gated, freqs, bc, agreement,
                     ablations, instance, main_attack, figures, threat, model_side, seeds)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    report += f"\n---\nMade by `logitguard demo` in {summary['seconds']:.0f} s.\n"
    _write_text(stage / "report.md", report)
    _write_text(stage / "summary.json", json.dumps(summary, indent=2, default=_json_default, allow_nan=True))
    log(f"[{summary['seconds']:6.1f}s] wrote {out / 'report.md'}")
    return summary


# ---------------------------------------------------------------------------------------------


def _check_demo_table(table: LogitTable, data: str | os.PathLike) -> None:
    missing = [s for s in ("train", "test") if s not in table.splits]
    if missing:
        raise LogitguardError(f"{data}: the demo needs 'train' and 'test' splits; missing {missing}")
    if not table.has_labels or CLEAN not in table.attacks or len(table.attacks) < 3:
        raise LogitguardError(f"{data}: the demo needs labels, clean rows and at least two attacks; "
                              f"the table has attacks {table.attacks}")


def _safe(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except LogitguardError as exc:
        return {"error": str(exc)}


def _figures(out: Path, freqs, transfer, bc, table, detectors, attack, histogram, threat=None) -> list[str]:
    from sklearn.metrics import roc_curve

    from . import plots

    plots.supporting_class_bars(freqs, out / "supporting_classes.png")
    plots.heatmap(transfer, out / "transfer.png", title="Accuracy after correction (rows: evaluated on)")
    plots.heatmap(bc, out / "bhattacharyya.png", title="Bhattacharyya coefficient of supporting classes")
    test = table.select(split="test")
    clean, attacked = pair(test, attack)
    hit = successful_attack(clean.logits.argmax(1), attacked.logits.argmax(1), clean.labels)
    clean_rows, attacked_rows = test.select(attacks=CLEAN), attacked.take(hit)
    curves = {}
    for name, detector in detectors.items():
        scores = np.r_[detector.score_table(clean_rows), detector.score_table(attacked_rows)]
        truth = np.r_[np.zeros(len(clean_rows)), np.ones(len(attacked_rows))]
        fpr, tpr, _ = roc_curve(truth, scores)
        curves[name] = (fpr, tpr, float(np.trapezoid(tpr, fpr)))
    plots.roc_curves(curves, out / "roc_pgd.png", title=f"Detectors on {attack} (successful attacks vs clean)")
    plots.mean_logit_histogram(histogram, out / "mean_logit.png")
    if threat is None or threat.empty:
        return list(FIGURES)
    plots.threat_curves(threat, out / THREAT_FIGURE)
    return [THREAT_FIGURE, *FIGURES]


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _model_side(folder: Path, stage: Path) -> dict[str, Any] | None:
    """The model-side comparison stored beside the table (``models/comparison.json``, from `data/models.sh`)
    and its curves, copied into the report (None when absent)."""
    results_file = folder / "comparison.json"
    if not results_file.is_file():
        return None
    results = json.loads(results_file.read_text())
    curves = []
    for png in sorted(folder.glob("curves/*/curve.png")):
        name = f"model-curve-{png.parent.name}.png"
        shutil.copyfile(png, stage / name)
        curves.append(name)
    return {"results": results, "curves": curves, "source": str(results_file)}


def _threat_models(table: LogitTable, manifest: Path) -> pd.DataFrame | None:
    """The threat-model table of the saved pipelines in `manifest` on `table`, the test rows (None without it)."""
    from ..defenses.pipelines import load_pipelines
    from ..evaluation.threat import detector_miss_table, threat_model_table

    manifest = Path(manifest)
    if not manifest.is_file():
        return None
    pipelines = {name: spec.build() for name, spec in load_pipelines(manifest).items()}
    frame = threat_model_table(table, pipelines)
    detectors = {name: p.detector for name, p in pipelines.items() if p.detector is not None}
    frame.attrs["misses"] = detector_miss_table(table, detectors)
    frame.attrs["describe"] = {name: {"detector": None if p.detector is None else p.detector.kind,
                                      "fpr": None if p.detector is None else p.detector.fpr,
                                      "corrector": None if p.corrector is None else type(p.corrector).__name__,
                                      "on_flag": p.on_flag} for name, p in pipelines.items()}
    return frame


