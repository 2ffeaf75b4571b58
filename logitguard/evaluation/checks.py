"""Checks a reviewer runs on the threat-model figures (docs/threat-models.md, "Checks").

- `tramer_check`: Tramèr (ICML 2022, "Detecting adversarial examples is (nearly) as hard as classifying
  them"): a detector-gated pipeline with robust accuracy R at budget ε (abstaining on an attacked input counts
  as defended, a rejected clean input as an error: the project's accounting) implies an inefficient classifier
  with robust accuracy at least R at ε/2. A pipeline whose implied figure beats the best robust classifier
  measured at ε/2 claims more than anyone knows how to build: its figure is more likely an attack failure.
- `attack_failure_indicators`: Pintor et al. (NeurIPS 2022, "Indicators of attack failure"), from the table:
  weaker tiers breaking samples the adaptive attacks missed, perturbations far inside the budget, and the
  producer's per-attack indicators (claimed, judge-rejected, stalled) recorded in the threat metadata.

Torch-free at import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import LogitguardError
from ..tables import LogitTable
from .metrics import ABSTAIN
from .threat import _Rows
from ..tables.threat import (BUDGET_TOLERANCE, DEFAULT_BUDGETS, NO_DEFENSE, TIERS, attack_eps, threat_of,
                             tier_parts)

if TYPE_CHECKING:
    from .evaluate import Defense

FAR_INSIDE = 0.5  # median linf / eps of successful rows below this: perturbations far inside the budget
INDICATOR_KEYS = ("ran", "claimed", "judge_rejected", "stalled")

__all__ = ["FAR_INSIDE", "TRAMER_COLUMNS", "attack_failure_indicators", "load_reference", "tramer_check"]


# ---------------------------------------------------------------------------------------------
# Tramèr's ε/2 check


def load_reference(path: str | os.PathLike | None) -> pd.DataFrame | None:
    """The robust accuracy of the project's own classifiers, from a ``compare-models`` JSON
    (data/models/comparison.json); None when `path` is None or not a file.

    Returns one row per (model, eps) of the bare models' (pipeline "none") adaptive figures: ``model``,
    ``eps``, ``samples``, ``clean_accuracy`` (on the model's test samples), ``robust_selected`` (robust
    accuracy over the samples that model gets right when clean) and ``robust_accuracy`` (over all test
    samples: robust_selected x clean_accuracy).
    """
    if path is None or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
        clean = {m["model"]: float(m["clean_accuracy"]) for m in data.get("models", [])}
        rows = [{"model": r["model"], "eps": float(r["eps"]), "samples": int(r["samples"]),
                 "clean_accuracy": clean.get(r["model"], float("nan")),
                 "robust_selected": float(r["robust_accuracy"])}
                for r in data.get("threat", [])
                if r.get("pipeline") == NO_DEFENSE and r.get("threat_model") == "adaptive"]
    except (ValueError, KeyError, TypeError) as err:
        raise LogitguardError(f"{path}: not a compare-models result ({err})") from None
    frame = pd.DataFrame(rows, columns=["model", "eps", "samples", "clean_accuracy", "robust_selected"])
    frame["robust_accuracy"] = frame["robust_selected"] * frame["clean_accuracy"]
    return frame


def tramer_check(
    frame: pd.DataFrame,
    reference: pd.DataFrame | None,
    *,
    gated: Collection[str] | None = None,
    base_accuracy: float | None = None,
) -> pd.DataFrame:
    """Tramèr's ε/2 implication for every detector-gated pipeline's adaptive figure in `frame`
    (`threat_model_table`), beside the best robust accuracy in `reference` (`load_reference`) at ε/2.

    gated: the pipelines with a detector (default: every pipeline but "none"). base_accuracy: the bare
    model's clean accuracy on the table's samples; with it both sides are put on the basis of all test
    samples (implied = robust accuracy x base_accuracy: the selected set's robust samples over all samples,
    a lower bound for a pipeline that only gives the model's label or abstains; reference = robust x clean
    accuracy of that classifier). Without it each figure stays on its own selected set (``basis``).

    Returns one row per (pipeline, eps): ``pipeline``, ``eps``, ``half_eps``, ``robust_accuracy`` (+_low,
    _high, selected set), ``implied`` (+_low, _high, on ``basis``), ``reference`` (best known at ε/2 on
    ``basis``: the best figure measured at ε/2 or at a larger budget, a lower bound there; NaN when none),
    ``reference_model``, ``reference_eps`` (where it was measured), ``verdict``: "exceeds" (implied >
    reference: implausible),
    "within interval" (implied_high > reference), "plausible" or "no reference".
    """
    rows = frame[(frame["threat_model"] == "adaptive") & (frame["pipeline"] != NO_DEFENSE)]
    if gated is not None:
        rows = rows[rows["pipeline"].isin(list(gated))]
    out = pd.DataFrame({"pipeline": rows["pipeline"].to_numpy(), "eps": rows["eps"].to_numpy(np.float64)})
    out["half_eps"] = out["eps"] / 2
    scale = 1.0 if base_accuracy is None else float(base_accuracy)
    for suffix in ("", "_low", "_high"):
        figure = rows.get(f"robust_accuracy{suffix}", pd.Series(np.nan, index=rows.index)).to_numpy(np.float64)
        out[f"robust_accuracy{suffix}"] = figure
        out[f"implied{suffix}"] = figure * scale
    out["basis"] = "selected samples (each its own)" if base_accuracy is None else "all test samples"
    out["reference"], out["reference_model"], out["reference_eps"] = np.nan, None, np.nan
    if reference is not None and len(reference):
        column = "robust_selected" if base_accuracy is None else "robust_accuracy"
        for i, half in enumerate(out["half_eps"]):
            # A classifier robust at a larger budget is at least as robust at ε/2: its figure there is a lower
            # bound on the best known at ε/2, so it still decides "exceeds" when nothing was measured at ε/2.
            at = reference[reference["eps"].to_numpy() >= half - BUDGET_TOLERANCE]
            if len(at):
                best = at.loc[at[column].idxmax()]
                out.loc[i, ["reference", "reference_eps"]] = float(best[column]), float(best["eps"])
                out.loc[i, "reference_model"] = str(best["model"])
    has = out["reference"].notna()
    out["verdict"] = np.select(
        [~has, out["implied"] > out["reference"], out["implied_high"] > out["reference"]],
        ["no reference", "exceeds", "within interval"], "plausible")
    return out[TRAMER_COLUMNS]


TRAMER_COLUMNS = ["pipeline", "eps", "half_eps", "robust_accuracy", "robust_accuracy_low", "robust_accuracy_high",
                  "implied", "implied_low", "implied_high", "basis", "reference", "reference_model", "reference_eps",
                  "verdict"]


# ---------------------------------------------------------------------------------------------
# Attack-failure indicators


def attack_failure_indicators(
    table: LogitTable,
    pipelines: Mapping[str, Defense],
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
) -> pd.DataFrame:
    """Pintor et al.'s indicators of attack failure per pipeline x budget where the pipeline has adaptive
    attacks of its own (samples and rows as in `threat_model_table`).

    Returns columns ``pipeline``, ``eps``, ``successes`` (attacked rows of the pipeline's own adaptive
    attacks run at eps that the pipeline gets wrong), ``linf_ratio_median`` (median linf / eps of those rows;
    far below 1: the attack did not need, or did not use, its budget), ``weaker_<tier>`` per weaker tier (the
    samples that tier's own attacks broke and the adaptive ones did not; None without such a tier),
    ``claimed``, ``judge_rejected``, ``stalled``, ``ran`` (summed over the producer's per-attack
    ``indicators`` of the partitions run at this eps; None when no partition recorded them) and ``producer``
    (the per-attack records: partition, attack and the four counts).
    """
    rows = _Rows(table, budgets)
    t = rows.table
    labels = rows.labels[rows.rows]
    records = []
    for name, defense in pipelines.items():
        tiers = tier_parts(t.metadata, t.attacks, name)
        if "adaptive" not in tiers:
            continue
        attacked = np.asarray(defense.predict_table(t))[rows.rows]
        broken_row = (attacked != labels) & (attacked != ABSTAIN)
        strong_attacks = tiers["adaptive"][1]
        strong_all = np.isin(rows.attack, strong_attacks)
        for eps in rows.budgets:
            inside = rows.in_budget[eps]
            strong = strong_all & inside
            if not strong.any():
                continue
            by_strong = np.zeros(rows.num_samples, bool)
            by_strong[rows.sample[strong & broken_row]] = True
            record: dict[str, Any] = {"pipeline": name, "eps": eps}
            # Partitions run at this budget (and their judge draws): smaller budgets' rows would pull the
            # linf ratio down without saying anything about this attack.
            own = [a for a in strong_attacks if (e := attack_eps(t.metadata, a)) is not None
                   and abs(e - eps) <= BUDGET_TOLERANCE]
            hit = np.isin(rows.attack, own) & inside & broken_row
            ratio = rows.size[hit] / eps
            record["successes"] = int(hit.sum())
            record["linf_ratio_median"] = float(np.median(ratio)) if ratio.size else float("nan")
            for tier in TIERS:
                if tier == "adaptive":
                    continue
                if tier not in tiers:
                    record[f"weaker_{tier}"] = None
                    continue
                weak = np.zeros(rows.num_samples, bool)
                weak[rows.sample[np.isin(rows.attack, tiers[tier][1]) & inside & broken_row]] = True
                record[f"weaker_{tier}"] = int((weak & ~by_strong).sum())
            record.update(_producer_indicators(t.metadata, [a for a in own if a not in rows.draws]))
            records.append(record)
    columns = ["pipeline", "eps", "successes", "linf_ratio_median",
               *(f"weaker_{tier}" for tier in TIERS if tier != "adaptive"), *INDICATOR_KEYS, "producer"]
    return pd.DataFrame.from_records(records, columns=columns)


def _producer_indicators(metadata: Mapping[str, Any], partitions: Sequence[str]) -> dict[str, Any]:
    """Totals of the ``indicators`` the producer recorded for `partitions` (a list aligned with
    ``sequence``, or an object keyed by attack name), and the per-attack records."""
    detail = []
    for partition in partitions:
        entry = threat_of(metadata, partition)
        indicators = entry.get("indicators")
        if isinstance(indicators, Mapping):
            pairs = list(indicators.items())
        elif isinstance(indicators, list):
            sequence = entry.get("sequence") or [str(i) for i in range(len(indicators))]
            pairs = list(zip(sequence, indicators))
        else:
            continue
        for attack, counts in pairs:
            if isinstance(counts, Mapping):
                detail.append({"partition": partition, "attack": attack,
                               **{k: counts.get(k) for k in (*INDICATOR_KEYS, "linf_ratio_median")}})
    totals = {k: (int(sum(d[k] or 0 for d in detail)) if detail else None) for k in INDICATOR_KEYS}
    return {**totals, "producer": detail}


