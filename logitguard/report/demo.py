"""The main job: every analysis on one logit table, written up as a Markdown report with PNG figures.

The report opens with a plain-language summary (`logitguard.report.threats`); every section ends with the
seed papers' published figures (`logitguard.report.published`), quoted with their setting beside ours.

`run_demo` inspects the table, trains correctors and detectors, evaluates them (seed Tables 1–3, the
p_clean trade-off, detector × attack, gated pipelines), explains the correctors (supporting classes,
ablation, Bhattacharyya similarity beside measured transfer) and writes ``report.md`` plus figures.
The demo trains smaller correctors than the paper's (`DEMO_CORRECTOR`) so that it finishes in a few
minutes on two CPU cores; the report says so and docs/corrector.md gives the paper-default figures.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
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
from ..tables.threat import format_budget, threat_of
from .published import load_reference, reference_block
from .summary import format_with_interval, markdown_frame, percent, summarize
from .threats import summary_section, threat_section

# D=1,000, 30 epochs, lr 1e-3 matched the paper defaults (D=10,000, 50 epochs, lr 5e-5) on the embedded
# PGD data within a point (clean 73.2% vs 72.9%, PGD 79.4% vs 78.8%) in 2.6 s instead of 48 s.
DEMO_CORRECTOR = {"hidden": 1000, "epochs": 30, "lr": 1e-3}
P_CLEAN_VALUES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
THREAT_FIGURE = "threat_curves.png"  # drawn when the report has a threat-model table
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
    summary: dict[str, Any] = {"data": str(data), "table": summarize(table.select(split="test"))}
    seeds = load_reference(reference)
    summary["reference"] = seeds.get("_path")

    step("threat models (saved pipelines)")
    threat = _threat_models(full, defenses if defenses is not None else Path(data).parent / "defenses" / MANIFEST)
    if threat is not None:
        summary["threat_models"] = to_records(threat)

    model_side = _model_side(Path(data).parent / "models", stage)
    if model_side is not None:
        summary["model_side"] = model_side["results"]

    step(f"training one corrector per attack ({', '.join(attacks)})")
    correctors = train_per_attack(table, attacks, progress=False, **DEMO_CORRECTOR)
    main_attack = "pgd" if "pgd" in attacks else attacks[0]
    accuracy = evaluate(table, {f"corrector({main_attack})": correctors[main_attack]})
    transfer = transfer_matrix(table, correctors)

    step(f"p_clean sweep on {main_attack}")
    sweep = sweep_p_clean(table, main_attack, P_CLEAN_VALUES, progress=False, **DEMO_CORRECTOR)

    # The logits-only detectors (kdensity and insen read other columns: section 8 compares them).
    step("fitting detectors (" + ", ".join(LOGIT_KINDS) + ")")
    has_noise = table.noisy_logits is not None
    detectors = {kind: make_detector(kind).fit_table(table) for kind in LOGIT_KINDS
                 if has_noise or not make_detector(kind).needs_noise}
    detection = detection_table(table, detectors)

    step("gated pipelines")
    svm = SVMCorrector().fit_table(table, "fgsm" if "fgsm" in attacks else main_attack)
    pipelines: dict[str, Any] = {f"corrector({main_attack}) alone": correctors[main_attack], "SVM alone": svm,
                                 "msp@5% → SVM": GatedDefense(detectors["msp"], svm)}
    if has_noise:
        odds_logistic = make_detector("odds", correction="logistic").fit_table(table)
        strict = detectors["learned-noisy"].with_fpr(0.01)
        pipelines |= {
            "odds@5% → SVM": GatedDefense(detectors["odds"], svm),
            "odds@5% → odds-logistic": GatedDefense(odds_logistic, odds_logistic),
            f"learned-noisy@1% → corrector({main_attack})": GatedDefense(strict, correctors[main_attack]),
            "learned-noisy@1% → odds-logistic": GatedDefense(strict, odds_logistic),
        }
    gated = evaluate(table, pipelines)

    step("supporting classes, ablation and Bhattacharyya similarity")
    freqs = pd.concat([explain.supporting_frequencies(correctors[a], table, a) for a in attacks], axis=1)
    bc = explain.bhattacharyya_matrix(freqs)
    agreement = {name: _safe(lambda r=relative: explain.rank_agreement(bc, transfer, relative=r))
                 for name, relative in (("absolute", False), ("relative", True))}
    ablations = pd.DataFrame([explain.ablation(correctors[a], table, a) for a in attacks]).set_index("attack")
    example = pair(table.select(split="test"), main_attack).attacked
    row = int(np.flatnonzero(example.logits.argmax(1) != example.labels)[0])
    instance = explain.instance_view(correctors[main_attack], example.logits[row], int(example.labels[row]))
    histogram = explain.mean_logit_counts(table)

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
    report = _report(table, data, summary, accuracy, transfer, sweep, detection, gated, freqs, bc, agreement,
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


def _model_side_section(model_side: dict[str, Any] | None, reference: dict[str, Any]) -> list[str]:
    """Section 8 from the stored comparison: its tables, the detector AUROCs pivoted to model × attack at the
    largest budget (every row stays in summary.json, ``model_side.detection``), and the seeds' figures."""
    from .modelside import format_model_side

    if model_side is None:
        return []
    results = model_side["results"]
    lines = format_model_side({**results, "detection": []}, curves=model_side["curves"])
    lines[0] = "## 8. " + lines[0].removeprefix("## ")
    lines.insert(2, f"From `{model_side['source']}` (made by `data/models.sh`, which trains the models and runs "
                    "every attack; `logitguard compare-models` computed these figures from the tables and saved "
                    "pipelines it left in its work folder).\n")
    detection = pd.DataFrame(results.get("detection") or [])
    if not detection.empty:
        lines += _model_side_detection(detection, results.get("budgets") or [])
    return lines + [reference_block("model_side", reference), ""]


def _model_side_detection(detection: pd.DataFrame, budgets: list[float]) -> list[str]:
    """Markdown lines: detector AUROC ×100 as model × attack at the largest budget (and unbounded attacks),
    each cell ``msp / nonme / kdensity / insen`` (the detectors present)."""
    from ..evaluation.modelside import DETECTORS

    top = max(budgets) if budgets else detection["eps"].max()
    keep = detection["eps"].isna() | ((detection["eps"] - top).abs() < 1e-6)
    keep &= detection["threat_model"].isin(["oblivious", "transfer"]) | (
        (detection["threat_model"] == "adaptive") & detection["target"].isin(["kdensity", "insen"]))
    part = detection[keep]
    if part.empty:
        return []
    detectors = [d for d in DETECTORS if d in set(part["detector"])]
    view = part.pivot_table(index=["model", "attack"], columns="detector", values="auroc", sort=False)
    view = view.reindex(columns=detectors)
    cells = view.apply(lambda r: " / ".join("–" if pd.isna(v) else f"{100 * v:.0f}" for v in r), axis=1)
    grid = cells.unstack("attack").fillna("–")
    grid = grid.loc[list(dict.fromkeys(part["model"]))].rename_axis("model")
    grid.columns.name = None
    return [f"**Detector AUROC ×100** (seed 001's Table 2 setting: attacked rows of samples the model gets right "
            f"clean and wrong attacked, against their clean rows), at ε = {format_budget(top)} and for unbounded "
            f"attacks; each cell is `{' / '.join(detectors)}`. `adaptive.kdensity.evade` is the white-box attack on "
            "K-density (seed 001's C&W-wb), `adaptive.insen.evade` the one on the insen detector: read their own "
            "detector. Every attack and budget, with the detection metrics the comparison stored: `summary.json`, "
            "key `model_side.detection`.", "", markdown_frame(grid), ""]


def _threat_models(table: LogitTable, manifest: Path) -> pd.DataFrame | None:
    """The threat-model table of the saved pipelines in `manifest` on the test split (None without it)."""
    from ..defenses.pipelines import load_pipelines
    from ..evaluation.threat import detector_miss_table, threat_model_table

    manifest = Path(manifest)
    if not manifest.is_file():
        return None
    pipelines = {name: spec.build() for name, spec in load_pipelines(manifest).items()}
    frame = threat_model_table(table, pipelines, split="test")
    detectors = {name: p.detector for name, p in pipelines.items() if p.detector is not None}
    frame.attrs["misses"] = detector_miss_table(table, detectors, split="test")
    frame.attrs["describe"] = {name: {"detector": None if p.detector is None else p.detector.kind,
                                      "fpr": None if p.detector is None else p.detector.fpr,
                                      "corrector": None if p.corrector is None else type(p.corrector).__name__,
                                      "on_flag": p.on_flag} for name, p in pipelines.items()}
    return frame


def _report(table, data, summary, accuracy, transfer, sweep, detection, gated, freqs, bc, agreement, ablations,
            instance, attack, figures, threat=None, model_side=None, reference=None) -> str:
    reference = reference or {}
    describe = None if threat is None else threat.attrs.get("describe")
    ref = lambda section: reference_block(section, reference)  # noqa: E731
    pct = lambda frame: frame.map(percent)  # noqa: E731
    lines = ["# logitguard demo report", ""]
    lines += summary_section(threat, describe)
    lines += [
        "## About this report",
        "",
        f"Data: `{data}` ({len(table)} rows, {table.num_classes} classes, attacks "
        f"{', '.join(a for a in table.attacks if a != CLEAN)}). "
        f"Model and attacks: {_provenance(table)}.",
        "",
        "**Ours** are measured in this run, on this data. Each section ends with a **Reference** block quoting the "
        "seed papers' published figures with their setting (dataset, model, attack)"
        + (f", read from `{reference['_path']}`" if reference.get("_path") else "") + ". They are not the same "
        "experiment and not our figures: compare directions and orders of magnitude, not digits. Every table "
        "here is also in `summary.json`, with the rows the report leaves out.",
        "",
        f"Correctors use the demo settings {DEMO_CORRECTOR} (p_clean 0.3, dropout 0.5); on this data they "
        "match the paper defaults within a point (docs/corrector.md).",
        "",
    ]
    lines += threat_section(threat, describe)
    lines += [ref("threat"), ""]
    if THREAT_FIGURE in figures:
        lines += ["![Robust accuracy per threat model against the budget](threat_curves.png)", ""]
    lines += [
        "Every figure below is measured against an **oblivious** attacker (the attacks of the table's train "
        "split, which ignore the defenses) unless it says otherwise.", "",
        "## 1. Correction (seed Tables 1–2; oblivious)",
        "",
    ]
    for subset, title in (("full", "Full test split"), ("selected", "Selected set (clean-correct samples)")):
        part = accuracy[accuracy["subset"] == subset].pivot(index="attack", columns="defense",
                                                           values=["clean_accuracy", "robust_accuracy"])
        defenses = list(dict.fromkeys(accuracy["defense"]))  # "none" first
        part = part[[(m, d) for m in ("clean_accuracy", "robust_accuracy") for d in defenses]]
        part.columns = [f"{'clean' if m == 'clean_accuracy' else 'attacked'} · {d}" for m, d in part.columns]
        lines += [f"**{title}, ours**", "", markdown_frame(pct(part)), ""]
    lines += [ref("correction"), ""]
    lines += ["## 2. Transfer between attacks (seed Table 3; oblivious)", "",
              "Accuracy after correction; rows: evaluated on, columns: corrector trained on (ours).", "",
              markdown_frame(pct(transfer)), "", ref("transfer"), ""]
    lines += [f"## 3. Clean vs robust accuracy over p_clean ({attack}, oblivious, ours)", "",
              markdown_frame(pct(sweep)), "", ref("p_clean"), ""]
    lines += _detection_section(detection) + [ref("detection"), ""]
    lines += ["## 5. Gated pipelines: detect, then correct flagged rows (oblivious, ours)", "",
              "`detector@FPR → corrector`: rows the detector flags get the corrector's label; others keep the "
              "model's argmax. Selected set.", "", markdown_frame(_gated_view(gated, attack)), "", ref("gated"), ""]
    lines += ["## 6. Supporting classes (seed §5, Fig. 2–3, App. B)", "",
              "Each attack's own corrector; k = " + str(int(ablations["k"].iloc[0])) + " classes per row, the true "
              "class left out (it is the top supporting class of most rows).", "",
              markdown_frame(pd.DataFrame({a: ", ".join(v) for a, v in summary["supporting_top3"].items()},
                                     index=["top-3 supporting classes"]).T.rename_axis("attack")), "",
              f"Instance view (seed App. B): one misclassified {attack} row, its top supporting scores:", "",
              markdown_frame(instance.map(lambda v: f"{v:.4f}").to_frame()), "",
              "**Ablation (seed §5.2)**: lower each row's supporting classes' logits by δ, or as many random "
              "classes (control), and re-run the corrector.", "",
              markdown_frame(_ablation_view(ablations)), "", ref("supporting"), ""]
    lines += ["## 7. Does supporting-class similarity predict transfer?", "",
              "Bhattacharyya coefficient BC(p, q) = Σ√(p_k q_k) between attacks' supporting-class distributions "
              "(ours):", "", markdown_frame(bc.map(lambda v: f"{v:.3f}")), "",
              "Spearman rank correlation between BC and measured transfer over ordered attack pairs "
              "(relative: transfer divided by the evaluated attack's own-corrector accuracy):", "",
              markdown_frame(pd.DataFrame(agreement).T.rename_axis("transfer").map(_fmt)), "", ref("bhattacharyya"),
              ""]
    lines += _model_side_section(model_side, reference)
    rest = [f for f in figures if f != THREAT_FIGURE]
    if rest:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in rest] + [""]
    lines += ["## Seed claims on our data", "",
              "The seeds measured against oblivious attackers, and so do these lines; the Summary and the Threat "
              "models section at the top say what survives an attacker who aims at the defense.", ""]
    lines += [f"- {c}" for c in _claims(summary, accuracy, transfer, sweep, detection, gated, ablations,
                                        agreement, attack, reference)]
    return "\n".join(lines) + "\n"


DETECTION_METRICS = (("auroc", "AUROC", False), ("aupr_in", "AUPR-in (clean rows positive)", False),
                     ("aupr_out", "AUPR-out (successful attacks positive)", False),
                     ("fpr_at_95_tpr", "FPR at 95% TPR (lower is better)", True))


def _detection_section(detection: pd.DataFrame) -> list[str]:
    """Section 4: detector × attack tables of AUROC, AUPR-in/out and FPR at 95% TPR (the metrics the table has,
    each with its interval where measured), and TPR at 1% FPR; TPR at 5% FPR stays in summary.json."""
    lines = ["## 4. Detectors × attacks (oblivious attacks, ours)", "",
             "Negatives: clean test rows; positives: successful attacks. Scores: higher = more adversarial. "
             "Brackets: 95% interval (bootstrap over rows) where measured; TPR at 5% FPR and every other column "
             "are in `summary.json`, key `detection`.", ""]
    for metric, title, share in DETECTION_METRICS:
        if metric not in detection.columns:
            continue
        fmt = _interval_cell(detection, metric, share)
        lines += [f"**{title}**", "", markdown_frame(_detection_view(detection, metric, fmt)), ""]
    lines += ["**TPR at 1% FPR**", "", markdown_frame(_detection_view(detection, "tpr_at_1", lambda r: percent(r["tpr_at_1"]))),
              "",
              "False-positive rate on clean test rows of each detector's own threshold, calibrated to 5% on its "
              "clean calibration rows: " + ", ".join(f"{d} {percent(f)}" for d, f in
                                                       detection.groupby("detector", sort=False)["threshold_fpr"]
                                                       .first().items()) + ".", ""]
    return lines


def _interval_cell(frame: pd.DataFrame, metric: str, share: bool) -> Callable[[Mapping[str, Any]], str]:
    """A cell formatter of `metric` for a record: a share (``5.2% [3.1, 8.0]``) or a score (``0.941 [0.93,
    0.95]``), with its ``_low`` / ``_high`` interval when the frame has them."""
    bounds = f"{metric}_low" in frame.columns and f"{metric}_high" in frame.columns

    def fmt(record: Mapping[str, Any]) -> str:
        value = record[metric]
        low, high = (record[f"{metric}_low"], record[f"{metric}_high"]) if bounds else (None, None)
        if share:
            return format_with_interval(value, low, high)
        if value is None or value != value:
            return "-"
        if low is None or high is None or low != low or high != high:
            return f"{value:.3f}"
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"

    return fmt


def _provenance(table: LogitTable) -> str:
    model = table.metadata.get("model", {})
    dataset = table.metadata.get("dataset", {})
    name = model.get("name") or model.get("arch") or "a model"
    accuracy = model.get("test_accuracy")
    trained = f" ({100 * accuracy:.2f}% test accuracy)" if isinstance(accuracy, float) else ""
    return f"{name}{trained} on {dataset.get('name', 'its dataset')}; provenance in the table's metadata"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) > 1:
        return str(int(value))  # counts (pandas turns a column with NaN-able values into floats)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _detection_view(detection: pd.DataFrame, metric: str,
                    fmt: Callable[[Mapping[str, Any]], str]) -> pd.DataFrame:
    """detector × attack table of one detection metric, each cell `fmt(record)`."""
    cells = detection.assign(_cell=[fmt(r) for r in detection.to_dict(orient="records")])
    view = cells.pivot(index="detector", columns="attack", values="_cell")
    return view.loc[list(dict.fromkeys(detection["detector"]))]


def _gated_view(gated: pd.DataFrame, attack: str) -> pd.DataFrame:
    part = gated[gated["subset"] == "selected"]
    clean = part.groupby("defense", sort=False)["clean_accuracy"].first()
    robust = part.pivot(index="defense", columns="attack", values="robust_accuracy")
    view = pd.concat([clean.rename("clean"), robust], axis=1).loc[clean.index]
    return view.map(percent).rename_axis("pipeline (selected set)")


def _ablation_view(ablations: pd.DataFrame) -> pd.DataFrame:
    view = ablations[["accuracy", "accuracy_supporting_lowered", "accuracy_random_lowered"]].map(percent)
    view.columns = ["corrected", "supporting lowered", "random lowered (control)"]
    return view


def _claims(summary, accuracy, transfer, sweep, detection, gated, ablations, agreement, attack,
            reference=None) -> list[str]:
    """One line per seed claim: what our data says, with the numbers."""
    full = accuracy[(accuracy["subset"] == "full") & (accuracy["attack"] == attack)].set_index("defense")
    none, corrected = full.iloc[0], full.iloc[1]
    claims = [
        f"Correction recovers attacked predictions: {attack} accuracy {percent(none['robust_accuracy'])} → "
        f"{percent(corrected['robust_accuracy'])}; clean accuracy {percent(none['clean_accuracy'])} → "
        f"{percent(corrected['clean_accuracy'])} "
        f"({100 * (none['clean_accuracy'] - corrected['clean_accuracy']):.1f} pp cost). "
        + ("Held." if corrected["robust_accuracy"] > none["robust_accuracy"] + 0.2 else "Did not hold."),
    ]
    lo, hi = sweep["clean_accuracy"].idxmin(), sweep["clean_accuracy"].idxmax()
    claims.append(f"p_clean trades clean for robust accuracy: clean {percent(sweep.at[lo, 'clean_accuracy'])} at "
                  f"p={lo} vs {percent(sweep.at[hi, 'clean_accuracy'])} at p={hi}; robust "
                  f"{percent(sweep.at[lo, 'robust_accuracy'])} vs {percent(sweep.at[hi, 'robust_accuracy'])}.")
    attacks = list(transfer.columns)
    diag = np.mean([transfer.at[a, a] for a in attacks])
    off = np.mean([transfer.at[a, b] for a in attacks for b in attacks if a != b])
    worst = min(((a, b) for a in attacks for b in attacks if a != b), key=lambda ab: transfer.at[ab])
    claims.append(f"Correctors transfer between attacks: mean own-attack accuracy {percent(diag)}, mean "
                  f"cross-attack {percent(off)}; the weakest transfer is a corrector trained on {worst[1]} "
                  f"evaluated on {worst[0]} ({percent(transfer.at[worst])}). See §2.")
    drop = (ablations["accuracy"] - ablations["accuracy_supporting_lowered"]).mean()
    control = (ablations["accuracy"] - ablations["accuracy_random_lowered"]).mean()
    claims.append(f"Supporting classes carry the correction: lowering them costs {100 * drop:.1f} pp on average, "
                  f"lowering random classes {100 * control:.1f} pp. " + ("Held." if drop > control else "Did not hold."))
    rho = agreement.get("absolute", {}).get("spearman")
    if rho is not None:
        claims.append(f"Bhattacharyya similarity predicts transfer: Spearman ρ = {rho:.2f} over "
                      f"{agreement['absolute']['pairs']} attack pairs (relative: "
                      f"{agreement.get('relative', {}).get('spearman', float('nan')):.2f}). "
                      + ("Held." if rho > 0.3 else "Weak or absent on our data."))
    pgd = detection[(detection["attack"] == attack)].set_index("detector")["auroc"]
    if "odds" in pgd:
        seed = (reference or {}).get("martin2019", {}).get("odds_test_detection_rate_mnist")
        claims.append(f"The odds test detects {attack}: AUROC {pgd['odds']:.3f} with K=8 noise queries"
                      + (f" (Martin 2019 reports about {percent(seed)} detected on MNIST)" if seed else "")
                      + f"; the learned detector with the same noise reactions reaches "
                      f"{pgd.get('learned-noisy', float('nan')):.3f}; single-shot odds {pgd['odds-single']:.3f}; "
                      f"MSP {pgd['msp']:.3f}, non-ME {pgd['nonme']:.3f}.")
    part = gated[(gated["subset"] == "selected")]
    best = None
    for name, group in part.groupby("defense", sort=False):
        g = group.set_index("attack")
        if name != "none" and g["clean_accuracy"].iloc[0] >= 0.97 and attack in g.index:
            if best is None or g.at[attack, "robust_accuracy"] > best[1]:
                best = (name, g.at[attack, "robust_accuracy"], g["clean_accuracy"].iloc[0])
    if best:
        claims.append(f"Gating keeps clean accuracy while recovering attacks: of the pipelines that keep at least "
                      f"97% of the selected set clean, `{best[0]}` recovers the most {attack} rows "
                      f"({percent(best[1])}, clean {percent(best[2])}), against an oblivious attacker.")
    return claims
