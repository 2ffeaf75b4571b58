"""The model-side comparison rendered for the report and `logitguard compare-models`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ..evaluation.modelside import DETECTORS
from ..tables.threat import NO_DEFENSE, format_budget
from .summary import percent, render_table

__all__ = ["format_model_side"]


def format_model_side(results: Mapping[str, Any], *, curves: Sequence[str] = ()) -> list[str]:
    """Markdown lines of the report section "Model-side and logit-side defenses"."""
    models = pd.DataFrame(results["models"])
    threat = pd.DataFrame(results["threat"])
    pipeline = results["pipeline"]
    lines = ["## Model-side and logit-side defenses (ours)", "",
             "One small CNN per training objective on Fashion-MNIST, each with its own logit table and its own "
             f"copy of the recommended logit pipeline (`{pipeline}`: learned-noisy detector at 1% FPR, reject), "
             "fitted on that model's train split. Robust accuracy is the per-sample worst case over every attack "
             "of the threat model within the L∞ budget, on the test samples the model gets right clean; a "
             "rejected attacked row counts as defended, a rejected clean row as an error. `none` = the model "
             "alone; its *adaptive* attacks are white-box attacks on the model (no defense to know).", ""]
    lines += render_table(["model", "objective", "clean accuracy (full test split)", "train seconds"],
                          [[r.model, r.objective + ("" if r.activation == "relu" else f" + {r.activation}"),
                            percent(r.test_accuracy_full if r.test_accuracy_full is not None else r.clean_accuracy),
                            "–" if pd.isna(r.train_seconds) else f"{r.train_seconds:.0f}"]
                           for r in models.itertuples()], markdown=True)
    lines += [""]
    if not threat.empty:
        tiers = [t for t in ("oblivious", "transfer", "surrogate", "adaptive") if t in set(threat["threat_model"])]
        view = threat.pivot_table(index=["model", "pipeline"], columns=["eps", "threat_model"], values="robust_accuracy",
                                  sort=False)
        header = ["model", "defense", "clean", "coverage"]
        keys = [(eps, tier) for eps in sorted(set(threat["eps"])) for tier in tiers if (eps, tier) in view.columns]
        header += [f"{tier} {format_budget(eps)}" for eps, tier in keys]
        budgets = sorted(set(threat["eps"]))
        header += [f"**lowest, all samples {format_budget(eps)}**" for eps in budgets]
        share = dict(zip(models["model"], models["clean_accuracy"]))
        base = threat.groupby(["model", "pipeline"], sort=False)[["clean_accuracy", "coverage"]].first()
        rows = []
        for (model, defense), values in view.iterrows():
            rows.append([model, defense, percent(base.at[(model, defense), "clean_accuracy"]),
                         percent(base.at[(model, defense), "coverage"]),
                         *("–" if pd.isna(values[k]) else percent(values[k]) for k in keys),
                         *(percent(share[model] * values[[k for k in keys if k[0] == eps]].min()) for eps in budgets)])
        lines += [f"**Robust accuracy per threat model** (per-sample worst case; `{NO_DEFENSE}` = the model alone, "
                  f"`{pipeline}` = with the logit pipeline; on the test samples the model gets right clean. The last "
                  "columns are the headline: the lowest of those figures, as a share of *all* test samples "
                  "(so a robust model's lower clean accuracy counts against it)", ""]
        lines += render_table(header, rows, markdown=True) + [""]
    detection = pd.DataFrame(results["detection"])
    if not detection.empty:
        # Seed 001's view: the oblivious and transfer attacks at the threat budgets (or unbounded), and the
        # white-box attacks aimed at K-density and InSen; not the small sweep points or attacks aimed at the
        # logit pipelines (their figures are in the robust-accuracy table).
        keep = (detection["threat_model"].isin(["oblivious", "transfer"])
                & (detection["eps"].isna() | (detection["eps"] >= min(results["budgets"]) - 1e-6)))
        keep |= (detection["threat_model"] == "adaptive") & detection["target"].isin(["kdensity", "insen"])
        view = detection[keep].pivot_table(index=["attack", "model"], columns="detector", values="auroc", sort=False)
        view = view[[d for d in DETECTORS if d in view.columns]]
        lines += ["**Detector AUROC** (seed 001's Table 2 setting: attacked rows of samples the model gets right "
                  "clean and wrong attacked, against their clean rows; ×100). `msp` = confidence, `kdensity` = "
                  "kernel density of the penultimate layer at the predicted class, `insen` = the logistic "
                  "detector on the exported input-sensitivity statistics, `external` = GRED's image-space "
                  "detector where exported. `adaptive.kdensity.evade.*` is the white-box attack on K-density "
                  "(seed 001's C&W-wb), `adaptive.insen.evade.*` the one on the insen detector (double "
                  "backpropagation through the InSen statistics); read their own detector's column.", ""]
        lines += render_table(["attack", "model", *view.columns],
                              [[a, m, *("–" if pd.isna(v) else f"{100 * v:.1f}" for v in values)]
                               for (a, m), values in zip(view.index, view.to_numpy())], markdown=True) + [""]
    external = pd.DataFrame(results.get("external") or [])
    if not external.empty:
        lines += ["**GRED** (seed 002, image-space, trained in the producer; oblivious = grey-box: the attacker "
                  "ignores GRED). Rectified: the rectifier's label on every attacked row; pipeline: the rectified "
                  "label where GRED's detector fires (score > 0.5), else the model's.", ""]
        lines += render_table(["model", "attack", "threat model", "model", "rectified", "pipeline",
                               "pipeline on clean", "detected", "clean flagged"],
                              [[r.model, r.attack, r.threat_model, percent(r.model_accuracy),
                                percent(r.rectified_accuracy), percent(r.pipeline_accuracy),
                                percent(r.pipeline_clean_accuracy), percent(r.detection_rate),
                                percent(r.false_positive_rate)] for r in external.itertuples()], markdown=True) + [""]
    for curve in curves:
        lines += [f"![robustness curve]({curve})", ""]
    return lines
