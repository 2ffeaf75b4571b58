"""The demo report's opening: a plain-language summary, then the threat-model tables it rests on.

Both read the frame of `logitguard.evaluation.threat.threat_model_table` (one row per pipeline × threat model
× budget). Columns added by later versions of that table are used when present and skipped when absent, so
the report reads old and new tables alike: ``*_low`` / ``*_high`` (95% intervals, shown as
``63.4% [60.1, 66.5]``), ``no_harm`` (``"established"`` when the interval of the harm lies at or above zero),
``draws`` (fresh noise draws the judge used) and ``robust_single_draw`` (the figure on draw 0 alone).
"Does no harm" is written only where ``no_harm == "established"``; without that column no interval exists
and the claim is "not established".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from ..tables.threat import NO_DEFENSE, format_budget
from .summary import format_with_interval, markdown_frame, percent

# Report order: from the attacker who knows least about the deployed system to the one who knows most.
TIER_ORDER = ("transfer", "query", "oblivious", "surrogate", "adaptive")
TIER_WORDS = {
    "transfer": "has only a substitute model and sends what fools it",
    "query": "can only send inputs to the deployed service and read its answers",
    "oblivious": "knows the model, not the defense",
    "surrogate": "has its own copy of the defense, trained on other data",
    "adaptive": "has the defense's files; worst case per sample over every attack we ran",
}
ESTABLISHED = "established"

__all__ = ["ESTABLISHED", "TIER_ORDER", "TIER_WORDS", "cell", "describe_pipeline", "recommend", "summary_section",
           "threat_section"]


def cell(row: Mapping[str, Any], column: str, *, signed: bool = False) -> str:
    """`row[column]` with its interval when the row has ``column_low`` / ``column_high``."""
    return format_with_interval(row.get(column), row.get(f"{column}_low"), row.get(f"{column}_high"), signed=signed)


def describe_pipeline(entry: Mapping[str, Any] | None) -> str:
    """Plain words for a pipeline from ``{"detector", "fpr", "corrector", "on_flag"}`` (`GatedDefense` parts)."""
    if not entry or (entry.get("detector") is None and entry.get("corrector") is None):
        return "the model alone"
    parts = []
    if entry.get("detector") is not None:
        fpr = entry.get("fpr")
        parts.append(f"the `{entry['detector']}` detector" + (f" at {100 * fpr:g}% false positives" if fpr else ""))
    policy = {"reject": "flagged inputs are refused",
              "agree": "a flagged input keeps the model's answer only when the corrector agrees, else is refused",
              "correct": "flagged inputs get the corrector's answer"}.get(entry.get("on_flag"), "")
    if entry.get("detector") is None and entry.get("corrector") is not None:
        policy = ("every input gets the corrector's answer" if entry.get("on_flag") == "correct"
                  else "an answer only where model and corrector agree")
    return "; ".join([", ".join(parts) or f"the `{entry.get('corrector')}` corrector", policy]).strip("; ")


def _adaptive(threat: pd.DataFrame) -> pd.DataFrame:
    return threat[threat["threat_model"] == "adaptive"]


def _established(rows: pd.DataFrame) -> bool:
    return "no_harm" in rows.columns and bool((rows["no_harm"] == ESTABLISHED).all()) and len(rows) > 0


def recommend(threat: pd.DataFrame) -> tuple[str | None, bool]:
    """The pipeline to deploy and whether its no-harm is established at every budget.

    Candidates: pipelines whose adaptive harm is established as >= 0 at every budget (``no_harm``); when there is
    none, those whose harm *estimate* is >= 0 everywhere (no-harm not established). Among them, the one with the
    highest adaptive robust accuracy at its worst budget, then the highest coverage. (None, False) when no
    pipeline qualifies: deploy the bare model.
    """
    adaptive = _adaptive(threat)
    groups = {name: rows for name, rows in adaptive.groupby("pipeline", sort=False) if name != NO_DEFENSE}
    established = [n for n, rows in groups.items() if _established(rows)]
    estimate = [n for n, rows in groups.items() if (rows["harm"] >= 0).all()]
    candidates, sure = (established, True) if established else (estimate, False)
    if not candidates:
        return None, False

    def key(name: str) -> tuple[float, float]:
        rows = groups[name]
        return float(rows["robust_accuracy"].min()), float(rows["coverage"].iloc[0])

    return max(candidates, key=key), sure


def _harm_words(row: Mapping[str, Any]) -> str:
    harm = cell(row, "harm", signed=True)
    if row.get("no_harm") == ESTABLISHED:
        return f"{harm}: does no harm (the interval lies at or above zero)"
    low = row.get("harm_low")
    if low is None or low != low:
        return f"{harm}: no harm not established (no interval measured)"
    return f"{harm}: no harm **not established** (the interval reaches below zero)"


def summary_section(threat: pd.DataFrame | None, describe: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """The report's first section: what to deploy and what it is worth against each attacker, in plain words."""
    lines = ["## Summary", ""]
    if threat is None or threat.empty:
        return lines + [
            "No saved pipelines (`defenses/defenses.json` beside the table) or no attacks aimed at them: every "
            "figure in this report holds only against an *oblivious* attacker, one who ignores the defense. It "
            "says nothing about an attacker who aims at the defense; do not deploy on these figures alone.", ""]
    describe = describe or {}
    best, sure = recommend(threat)
    samples = int(threat["samples"].iloc[0])
    budgets = sorted(set(threat["eps"]))
    tiers = [t for t in TIER_ORDER if t in set(threat["threat_model"])]
    if best is None:
        lines += ["**What to deploy:** none of the logit defenses measured here. Against an attacker who aims at "
                  "the defense, each ends at or below the model alone at some budget; keep the bare model and read "
                  "the defenses' figures below as figures against attackers who ignore them.", ""]
        shown = NO_DEFENSE
    else:
        first = threat[threat["pipeline"] == best].iloc[0]
        lines += [f"**What to deploy:** `{best}` ({describe_pipeline(describe.get(best))}). On clean inputs it "
                  f"answers {cell(first, 'coverage')} and is right on {cell(first, 'clean_accuracy')} of the "
                  f"{samples} test samples the model alone gets right"
                  + ("." if sure else "; its no-harm is not established at every budget (see below)."), ""]
        shown = best
    rows = threat[threat["pipeline"] == shown]
    bare = threat[threat["pipeline"] == NO_DEFENSE]
    table = []
    for tier in tiers:
        mine = rows[rows["threat_model"] == tier].set_index("eps")
        if mine.empty:
            continue
        name = "**adaptive (headline)**" if tier == "adaptive" else tier
        fewer = sorted({int(n) for n in mine["samples"] if int(n) != samples})
        words = TIER_WORDS[tier] + (f" (measured on the first {', '.join(map(str, fewer))} of them)" if fewer else "")
        table.append([name, words,
                      *(cell(mine.loc[e], "robust_accuracy") if e in mine.index else "–" for e in budgets)])
    if shown != NO_DEFENSE:
        mine = bare[bare["threat_model"] == "adaptive"].set_index("eps")
        table.append(["model alone, adaptive", "white-box attacks on the model",
                      *(cell(mine.loc[e], "robust_accuracy") if e in mine.index else "–" for e in budgets)])
    frame = pd.DataFrame(table, columns=["attacker", "what the attacker has", *(f"ε = {format_budget(e)}"
                                                                                 for e in budgets)])
    lines += [f"**What it is worth against each attacker**: the share of those {samples} samples on which "
              f"`{shown}` still answers right or refuses, when every input may be perturbed by up to ε (L∞), "
              "with its 95% interval in brackets where measured. The adaptive row is the headline: the attacker "
              "has everything, and a sample counts only if it survived every attack we ran.", "",
              markdown_frame(frame, index=False), ""]
    adaptive = _adaptive(rows).set_index("eps")
    if shown != NO_DEFENSE and not adaptive.empty:
        words = [f"at ε = {format_budget(e)}, {_harm_words(adaptive.loc[e])}" for e in budgets if e in adaptive.index]
        lines += [f"**Against the model alone** (adaptive figure minus the model's, in points): " + "; ".join(words)
                  + ". A pipeline that only ever answers the model's label or refuses cannot lose a sample the "
                  "model keeps; what matters is the size of the gain, and most attacked inputs still get through.",
                  ""]
        draws = int(adaptive["draws"].min()) if "draws" in adaptive.columns and adaptive["draws"].notna().all() else 1
        if draws > 1:
            lines += [f"Randomised defenses are judged on {draws} fresh noise draws the attacker never saw; a sample "
                      "counts only if it holds on every draw.", ""]
    relabel = [n for n, r in _adaptive(threat).groupby("pipeline", sort=False)
               if n != NO_DEFENSE and (r["harm"] < 0).any()]
    if relabel:
        lines += ["**Do not deploy against an attacker who can see or copy the defense**: "
                  + ", ".join(f"`{n}`" for n in relabel) + " end below the model alone against the adaptive "
                  "attacker (table below).", ""]
    return lines


def threat_section(threat: pd.DataFrame | None, describe: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Per pipeline × budget: clean accuracy, coverage and worst-case robust accuracy per tier, with intervals."""
    lines = ["## Threat models: what each defense is worth against each attacker (ours)", ""]
    if threat is None or threat.empty:
        return lines + ["No saved pipelines (`defenses/defenses.json` beside the table) or no attacks aimed at "
                        "them: the figures below hold only against an *oblivious* attacker.", ""]
    tiers = [t for t in TIER_ORDER if t in set(threat["threat_model"])]
    samples = int(threat["samples"].iloc[0])
    table = []
    for (name, eps), group in threat.groupby(["pipeline", "eps"], sort=False):
        by = {r["threat_model"]: r for r in group.to_dict(orient="records")}
        first = group.iloc[0].to_dict()
        adaptive = by.get("adaptive", {})
        row = {"pipeline": name, "ε": format_budget(eps), "clean": cell(first, "clean_accuracy"),
               "coverage": cell(first, "coverage"),
               **{t: cell(by[t], "robust_accuracy") if t in by else "–" for t in tiers}}
        if "robust_single_draw" in threat.columns:
            row["adaptive, draw 0 only"] = percent(adaptive.get("robust_single_draw"))
        row["harm (adaptive − model)"] = cell(adaptive, "harm", signed=True) if adaptive and name != NO_DEFENSE else "–"
        if "no_harm" in threat.columns:
            row["no harm"] = (adaptive.get("no_harm") or "–") if name != NO_DEFENSE else "–"
        table.append(row)
    order = {n: i for i, n in enumerate(dict.fromkeys(threat["pipeline"]))}
    frame = pd.DataFrame(table)
    frame = frame.iloc[sorted(range(len(frame)), key=lambda i: (frame["ε"].iloc[i] != frame["ε"].iloc[0],
                                                                 order[frame["pipeline"].iloc[i]]))]
    glossary = "; ".join(f"`{n}` = {describe_pipeline(d)}" for n, d in (describe or {}).items())
    lines += [
        f"Selected test samples ({samples}: those the model alone gets right when clean). Each robustness figure "
        "is the **per-sample worst case** over every attack of that threat model within the budget ε: "
        + "; ".join(f"*{t}*: the attacker {TIER_WORDS[t]}" for t in tiers) + ". An attacked input the pipeline "
        "refuses counts as defended; a refused clean input counts as an error (coverage). Brackets: 95% interval "
        "(exact binomial for rates, paired bootstrap over samples for the harm) where measured. Harm: the adaptive "
        "figure minus the model alone's adaptive figure; *no harm* is established only where its interval lies at "
        "or above zero." + (f" Pipelines: {glossary}." if glossary else ""), "",
        markdown_frame(frame, index=False), ""]
    misses = threat.attrs.get("misses")
    if misses is not None and not misses.empty:
        view = misses[misses["threat_model"].isin(["oblivious", "adaptive"])].copy()
        view["budget"] = view["eps"].map(format_budget)
        view = view.pivot_table(index=["detector", "kind"], columns=["threat_model", "budget"],
                                values=["missed_at_1", "missed_at_5"], sort=False)
        view.columns = [f"missed @{m[-1]}% · {t} {b}" for m, t, b in view.columns]
        lines += ["**Detectors alone**: share of successful attacks (the model is fooled) the detector does not "
                  "flag, recalibrated to 1% and 5% FPR on its clean calibration rows; adaptive rows are the "
                  "attacks aimed at that pipeline.", "", markdown_frame(view.map(percent)), ""]
    return lines
