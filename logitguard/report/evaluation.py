"""Plain-text renderings of `evaluate` and `detection_table` results (`logitguard evaluate`, `detect`)."""

from __future__ import annotations

import pandas as pd

from ..evaluation.intervals import with_interval
from .summary import percent, render_table

__all__ = ["format_detection", "format_evaluation"]


def format_evaluation(results: pd.DataFrame) -> str:
    """Plain-text Tables 1–2: per subset, one row per attack, clean/attacked accuracy per defense.

    Defenses that reject some clean rows also get a coverage column.
    """
    blocks = []
    defenses = list(dict.fromkeys(results["defense"]))
    abstaining = [d for d in defenses if "coverage" in results
                  and (results.loc[results["defense"] == d, "coverage"] < 1).any()]
    columns = ([("clean_accuracy", d, f"clean ({d})") for d in defenses]
               + [("coverage", d, f"coverage ({d})") for d in abstaining]
               + [("robust_accuracy", d, f"attacked ({d})") for d in defenses])
    for subset, title in (("full", "Full split"), ("selected", "Selected set (clean-correct samples)")):
        part = results[results["subset"] == subset]
        headers = ["attack", "samples"] + [header for _, _, header in columns]
        rows = []
        for attack, group in part.groupby("attack", sort=False):
            by = group.set_index("defense")
            rows.append([attack, str(group["samples"].iloc[0])]
                        + [percent(by.at[d, metric]) for metric, d, _ in columns])
        blocks.append("\n".join([title, *render_table(headers, rows, left=2)]))
    if abstaining:
        blocks.append("(a rejected attacked row counts as defended, a rejected clean row as an error; "
                      "see docs/threat-models.md)")
    return "\n\n".join(blocks)


def format_detection(results: pd.DataFrame) -> str:
    """Plain-text detector × attack table: AUROC, AUPR-in/out and FPR@95%TPR with their 95% intervals,
    TPR@1%, TPR@5%, detection accuracy."""
    headers = ["detector", "attack", "AUROC", "AUPR-in", "AUPR-out", "FPR@95%TPR", "TPR@1%", "TPR@5%", "det. acc",
               "FPR (calibrated)"]
    records = results.to_dict(orient="records")
    rows = [[r["detector"], r["attack"], with_interval(r, "auroc", digits=3), with_interval(r, "aupr_in", digits=3),
             with_interval(r, "aupr_out", digits=3), with_interval(r, "fpr_at_95_tpr"), percent(r["tpr_at_1"]),
             percent(r["tpr_at_5"]), percent(r["detection_accuracy"]), percent(r["threshold_fpr"])] for r in records]
    return "\n".join([*render_table(headers, rows, left=2),
                      "(95% intervals: bootstrap over rows, clean and attacked resampled apart; positives are the"
                      " successful attacked rows)"])
