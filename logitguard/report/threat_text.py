"""Plain-text renderings of the threat evaluation: per-tier robustness, detector misses, the plausibility
check, attack-failure indicators and what returning scores costs (`logitguard threat`, guards, the report)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from ..evaluation.checks import FAR_INSIDE
from ..evaluation.intervals import with_interval
from ..tables.threat import TIERS, format_budget
from .summary import percent, render_table

__all__ = ["format_detector_misses", "format_indicators", "format_query_access", "format_threat_models",
           "format_tramer"]


def format_threat_models(results: pd.DataFrame) -> str:
    """Plain text: one line per pipeline x budget; clean accuracy, coverage and robust accuracy per tier, each
    with its 95% interval, the judge draws, harm with its interval and the no-harm verdict (adaptive tier).

    Reads records without the interval columns too (guards saved before they existed)."""
    tiers = [t for t in TIERS if t in set(results["threat_model"])]
    records = results.to_dict(orient="records")
    multi = any((r.get("draws") or 1) > 1 for r in records)
    headers = ["pipeline", "eps", "samples", "draws", "clean", "coverage", *tiers,
               *(["adaptive (draw 0)"] if multi else []), "harm (points)", "no harm"]
    lines, gaps, fewer = [], [], []
    for (name, eps), group in results.groupby(["pipeline", "eps"], sort=False):
        by = {r["threat_model"]: r for r in group.to_dict(orient="records")}
        top = by.get("adaptive") or by[[t for t in tiers if t in by][-1]]
        harm = by.get("adaptive", {})
        lines.append([name, format_budget(eps), str(top["samples"]), str(top.get("draws", 1)),
                      with_interval(top, "clean_accuracy"), with_interval(top, "coverage"),
                      *(with_interval(by[t], "robust_accuracy") if t in by else "-" for t in tiers),
                      *([percent(harm.get("robust_single_draw"))] if multi else []),
                      _points(harm), harm.get("no_harm") or "-"])
        gaps += [f"{name} {r['threat_model']} {format_budget(eps)}: {r['judge_gaps']}" for r in by.values()
                 if (r.get("judge_gaps") or 0) > 0]
        fewer += [f"{name} {t} {format_budget(eps)}: {by[t]['samples']}" for t in tiers
                  if t in by and by[t]["samples"] != top["samples"]]
    return "\n".join([
        "Robust accuracy per threat model (selected set: samples the bare model gets right when clean)",
        *render_table(headers, lines, left=2),
        "(per-sample worst case over the tier's attacks within eps, on every judge draw; a rejected attacked row",
        " counts as defended, a rejected clean row as an error; [95% interval]: exact binomial for rates, paired",
        " bootstrap over samples for harm = adaptive minus the undefended model's adaptive; no harm is",
        " established only when the interval of harm lies at or above 0; see docs/threat-models.md)",
        *([f"measured on fewer samples (query attacks may cover the first ones only): {'; '.join(fewer)}"]
          if fewer else []),
        *([f"warning: samples missing from judge draws that no earlier draw broke: {'; '.join(gaps)}"]
          if gaps else []),
    ])


def _points(record: Mapping[str, Any]) -> str:
    """Harm in points with its interval: ``+4.2 [+1.0, +7.3]``; ``-`` when undefined."""
    harm, low, high = (record.get(k) for k in ("harm", "harm_low", "harm_high"))
    if harm is None or harm != harm:
        return "-"
    text = f"{100 * harm:+.1f}"
    if low is None or high is None or low != low or high != high:
        return text
    return f"{text} [{100 * low:+.1f}, {100 * high:+.1f}]"


def format_detector_misses(results: pd.DataFrame) -> str:
    """Plain text: per detector x threat model x budget, the share of successful attacks not flagged."""
    extra = [c for c in results.columns if c.startswith("missed_at_")]
    headers = ["detector", "kind", "threat", "eps", "successful", "missed (own FPR)",
               *(f"missed @{c.removeprefix('missed_at_').replace('_', '.')}%" for c in extra)]
    lines = [[r["detector"], r["kind"], r["threat_model"], format_budget(r["eps"]), str(r["successful"]),
              f"{percent(r['missed'])} @{100 * r['fpr']:g}%", *(percent(r[c]) for c in extra)]
             for r in results.to_dict(orient="records")]
    if not lines:
        return "Detectors: none in these pipelines"
    return "\n".join(["Successful attacks the detector does not flag", *render_table(headers, lines, left=4)])


def format_tramer(check: pd.DataFrame) -> str:
    """Plain text of `tramer_check`: one line per gated pipeline and budget."""
    if not len(check):
        return "Tramèr's ε/2 check: no detector-gated pipeline with an adaptive figure"
    headers = ["pipeline", "eps", "adaptive (selected)", "implies at eps/2", "best known at eps/2", "verdict"]
    lines = [[r["pipeline"], format_budget(r["eps"]), with_interval(r, "robust_accuracy"), with_interval(r, "implied"),
              "-" if r["reference"] != r["reference"] else
              f"{percent(r['reference'])} ({r['reference_model']}, at {format_budget(r['reference_eps'])})",
              r["verdict"] if r["verdict"] != "no reference" else f"no reference at {format_budget(r['half_eps'])}"]
             for r in check.to_dict(orient="records")]
    return "\n".join([
        "Tramèr's ε/2 check: a detector robust at eps implies a classifier as robust at eps/2",
        *render_table(headers, lines, left=2),
        f"(basis: {check['basis'].iloc[0]}; best known: the project's own classifiers, adversarially",
        " trained ones included, adaptive tier, measured at eps/2 or a larger budget (a lower bound at eps/2);",
        " 'exceeds': better than any classifier measured, most likely an attack that failed)",
    ])


def format_indicators(indicators: pd.DataFrame) -> str:
    """Plain text of `attack_failure_indicators`, and one warning line per indicator that fired."""
    if not len(indicators):
        return "Attack-failure indicators: no pipeline has adaptive attacks of its own"
    weaker = [c for c in indicators.columns if c.startswith("weaker_") and indicators[c].notna().any()]
    headers = ["pipeline", "eps", "successes", "linf/eps", *(c.removeprefix("weaker_") + " only" for c in weaker),
               "claimed", "judge rejected", "stalled"]

    def count(value: Any) -> str:
        return "-" if value is None or value != value else str(int(value))

    def fired(value: Any) -> bool:  # recorded (not None / NaN) and above zero
        return value is not None and value == value and value > 0

    lines, warnings = [], []
    for r in indicators.to_dict(orient="records"):
        where = f"{r['pipeline']} {format_budget(r['eps'])}"
        ratio = r["linf_ratio_median"]
        lines.append([r["pipeline"], format_budget(r["eps"]), str(r["successes"]),
                      "-" if ratio != ratio else f"{ratio:.2f}", *(count(r[c]) for c in weaker),
                      count(r["claimed"]), count(r["judge_rejected"]), count(r["stalled"])])
        for c in weaker:
            if fired(r[c]):
                warnings.append(f"{where}: {count(r[c])} samples broken by the {c.removeprefix('weaker_')} tier "
                                "that the adaptive attacks missed")
        if ratio == ratio and ratio < FAR_INSIDE:
            warnings.append(f"{where}: successful adaptive perturbations use a median {ratio:.2f} of the budget")
        if fired(r["judge_rejected"]):
            warnings.append(f"{where}: {count(r['judge_rejected'])} claimed successes the judge rejected")
        if fired(r["stalled"]):
            warnings.append(f"{where}: {count(r['stalled'])} samples whose loss stopped improving early")
    return "\n".join([
        "Attack-failure indicators (Pintor et al. 2022), the pipeline's own adaptive attacks",
        *render_table(headers, lines, left=2),
        "(<tier> only: samples that tier broke and the adaptive attacks missed; linf/eps: median of successful",
        " adaptive rows; claimed / judge rejected / stalled: recorded by the producer, - when not recorded)",
        *(f"warning: {w}" for w in warnings),
    ])


def format_query_access(access: pd.DataFrame) -> str:
    """Plain text: per pipeline x budget, each query attack's robust accuracy, and the cost of returning scores
    (labels-only minus scores figure, in points) where both were measured."""
    if access.empty:
        return "Query attackers: none in this table (logitguard-produce attack-defenses --tier query)"
    lines = []
    for (name, eps), group in access.groupby(["pipeline", "eps"], sort=False):
        by = {r["returns"]: r for r in group.to_dict(orient="records")}
        cost = "-"
        if "scores" in by and "labels" in by:
            cost = f"{100 * (by['labels']['robust_accuracy'] - by['scores']['robust_accuracy']):+.1f}"
        for r in group.to_dict(orient="records"):
            median = "-" if r["median_queries"] is None else f"{r['median_queries']:g}"
            lines.append([name, format_budget(eps), r["attack"], str(r["returns"]), str(r["query_budget"]),
                          str(r["samples"]), str(r["draws"]), with_interval(r, "robust_accuracy"), median, cost])
    headers = ["pipeline", "eps", "attack", "sees", "queries", "samples", "draws", "robust", "median queries",
               "scores cost (points)"]
    return "\n".join(["What a query attacker gets from the service's answers (each query attack alone)",
                      *render_table(headers, lines, left=4),
                      "(scores cost: labels-only robust accuracy minus the scores attacker's, same samples)"])
