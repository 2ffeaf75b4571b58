"""Threat models: what an attacker knew, and robustness reported per threat model.

The vocabulary (which attacker each partition had, budgets) is the table contract's: `logitguard.tables.threat`.

Evaluation: `threat_model_table` gives, per pipeline x threat model x L-inf budget, the *per-sample worst
case* over every attack of that tier: a sample counts as robust only when the pipeline is right on, or
rejects, every one of its rows from those attacks within the budget (and is right on, or rejects, its
clean row: the unperturbed input is in every budget). `detector_miss_table` gives the share of successful
attacks a detector lets through. Both are vectorised over rows; loops run over pipelines, tiers and
budgets only.

Torch-free at import.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..defenses.gated import GatedDefense
from ..errors import LogitguardError, TableError
from .intervals import binomial_interval, paired_bootstrap_interval
from .metrics import ABSTAIN, successful_attack
from ..tables import CLEAN, LogitTable, require_one_split
from ..tables.threat import (BUDGET_TOLERANCE, DEFAULT_BUDGETS, NO_DEFENSE, attack_eps, judge_draws, subset_partitions,
                             threat_of, tier_parts)

if TYPE_CHECKING:
    from ..defenses.detectors import Detector
    from .evaluate import Defense

# ---------------------------------------------------------------------------------------------
# Evaluation


class _Rows:
    """What every pipeline's evaluation shares: the selected samples, their clean and attacked rows, and
    which attacked rows are within each budget."""

    def __init__(self, table: LogitTable, budgets: Sequence[float]) -> None:
        require_one_split(table, "threat-model evaluation")
        if not table.has_labels:
            raise LogitguardError("threat-model evaluation needs ground-truth labels, and some rows have none")
        if CLEAN not in table.attacks:
            raise LogitguardError(f"threat-model evaluation needs clean rows; the table has {table.attacks}")
        if not budgets:
            raise LogitguardError("give at least one budget")
        # Every tier is measured on the same samples: those with a row in every partition (attacks run on
        # fewer samples, such as the adaptive ones, set the sample set for all), except the partitions that
        # hold a subset by design (`subset_partitions`: judge draws, continuations, and query attacks, whose
        # tier is measured on the samples they cover).
        self.draws = judge_draws(table.metadata, table.attacks)
        self.subset = subset_partitions(table.metadata, table.attacks)
        counted = pd.Series(table.attack).where(~np.isin(table.attack, self.subset))
        keys = pd.DataFrame({"split": table.split, "sample_id": table.sample_id, "attack": counted})
        partitions = keys.groupby(["split", "sample_id"])["attack"].transform("nunique").to_numpy()
        needed = len(table.attacks) - len(self.subset)
        if (partitions < needed).any():
            table = table.take(partitions == needed)
        self.table, self.budgets = table, tuple(float(b) for b in budgets)
        keys = pd.MultiIndex.from_arrays([table.split, table.sample_id])
        clean = np.flatnonzero(table.attack == CLEAN)
        labels, argmax = table.labels, table.logits.argmax(axis=1)
        # The selected set: samples the bare model gets right when clean.
        self.clean_rows = clean[argmax[clean] == labels[clean]]
        sample = pd.MultiIndex.from_arrays([table.split[self.clean_rows], table.sample_id[self.clean_rows]])
        index = sample.get_indexer(keys)  # each row's selected sample, -1 when not selected
        attacked = (table.attack != CLEAN) & (index >= 0)
        self.rows = np.flatnonzero(attacked)
        self.sample = index[self.rows]
        mismatch = np.flatnonzero(labels[self.rows] != labels[self.clean_rows][self.sample])
        if len(mismatch):
            r = self.rows[mismatch[0]]
            raise TableError(f"sample_id {table.sample_id[r]} (split {table.split[r]!r}) has label "
                             f"{labels[self.clean_rows][self.sample[mismatch[0]]]} in clean rows but {labels[r]} "
                             f"in {table.attack[r]!r} rows")
        self.attack = table.attack[self.rows]
        self.labels = labels
        self.bare_right = argmax[self.rows] == labels[self.rows]
        self.successful = successful_attack(argmax[self.clean_rows][self.sample], argmax[self.rows], labels[self.rows])
        size = self.size = self._size()
        self.in_budget = {eps: size <= eps + BUDGET_TOLERANCE for eps in self.budgets}

    def _size(self) -> np.ndarray:
        """Each attacked row's L-inf size: the ``linf`` column, else the attack's metadata eps, else 0
        (an unbounded attack without sizes is in every budget)."""
        size = np.full(len(self.rows), np.nan)
        if "linf" in self.table.columns:
            size = self.table.column("linf")[self.rows].astype(np.float64)
        missing = np.isnan(size)
        if missing.any():
            meta = self.table.metadata
            for attack in np.unique(self.attack[missing]):
                eps = attack_eps(meta, attack)
                size[missing & (self.attack == attack)] = 0.0 if eps is None else eps
        return size

    @property
    def num_samples(self) -> int:
        return len(self.clean_rows)

    def tiers(self, name: str) -> Iterator[tuple[str, float, np.ndarray]]:
        """(tier, eps, mask over `rows`) for pipeline `name`: the rows of the tier's attacks within eps, for
        each tier and budget where at least one row of the tier's own attacks is within eps."""
        for tier, (every, own) in tier_parts(self.table.metadata, self.table.attacks, name).items():
            in_tier, in_own = np.isin(self.attack, every), np.isin(self.attack, own)
            for eps in self.budgets:
                if (in_own & self.in_budget[eps]).any():
                    yield tier, eps, in_tier & self.in_budget[eps]

    def used(self, mask: np.ndarray) -> list[str]:
        return sorted(np.unique(self.attack[mask]).tolist())

    def own(self, name: str, tier: str) -> list[str]:
        """The tier's own attacks for pipeline `name` (`tier_attacks`: those not inherited from below)."""
        return tier_parts(self.table.metadata, self.table.attacks, name)[tier][1]

    def judge_gaps(self, name: str, broken_row: np.ndarray, clean_broken: np.ndarray) -> dict[str, int]:
        """Per judge-draw partition aimed at `name`: selected samples missing from it although neither an
        earlier draw of the same parent (nor their clean row) broke them: rows the producer should have
        written. `broken_row` (len(rows),) and `clean_broken` (samples,) are the pipeline's verdicts."""
        n, gaps = self.num_samples, {}
        for attack, (parent, k) in self.draws.items():
            if threat_of(self.table.metadata, attack).get("target") != name:
                continue
            # a continuation (`after`) leaves out, draws included, what the partitions it continued broke
            before = [parent, *threat_of(self.table.metadata, parent).get("after", [])]
            earlier = [*before, *(a for a, (p, j) in self.draws.items() if (p == parent and j < k) or
                                  (p in before and p != parent))]
            present, attacked = np.zeros(n, bool), np.zeros(n, bool)
            present[self.sample[self.attack == attack]] = True
            attacked[self.sample[self.attack == parent]] = True  # a draw re-judges only its parent's samples
            broken = clean_broken.copy()
            broken[self.sample[np.isin(self.attack, earlier) & broken_row]] = True
            gaps[attack] = int((attacked & ~present & ~broken).sum())
        return gaps


def threat_model_table(
    table: LogitTable,
    pipelines: Mapping[str, Defense],
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
) -> pd.DataFrame:
    """Clean accuracy, coverage and per-sample worst-case robust accuracy per pipeline x threat model x budget.

    Over the *selected* samples (the bare model is right on the clean row) that have a row in every
    partition of `table` (rows of one split: ``table.select(split="test")``), so every tier and pipeline is
    measured on the same samples. A sample is robust under a tier at budget eps when the pipeline is right or abstains on every row of that sample from the tier's
    attacks (`tier_attacks`) whose ``linf`` <= eps + 1e-6, and on its clean row. Rows without ``linf``
    use the attack's metadata eps; an unbounded attack with neither is in every budget. The bare model is
    added as "none" when `pipelines` has no pipeline of that name.

    Judge draws (docs/threat-models.md): partitions whose threat entry has ``judge_of`` are further draws of
    their parent's noise; they are attacks of the parent's tier, so a sample is robust only if it holds on
    every draw, and they do not take part in the "row in every partition" rule.

    Returns
    -------
    Long-form DataFrame, one row per (pipeline, threat_model, eps) where the tier has at least one row
    of its own attacks within eps (no "adaptive" row without an adaptive attack aimed at the pipeline):

    - ``pipeline``, ``threat_model``, ``eps``, ``samples``;
    - ``draws``: the most judge draws (``judge_draws`` of the entry, 1 when absent) among the tier's own
      partitions within eps (partitions judged on fewer draws count as well: they can only lower the figure);
    - ``clean_accuracy``, ``coverage``, ``robust_accuracy``, each with ``_low`` / ``_high``: exact 95%
      Clopper–Pearson interval over the samples;
    - ``robust_single_draw``: robust accuracy from draw 0 alone (judge-draw partitions left out);
    - ``harm``: ``robust_accuracy`` minus the "none" pipeline's adaptive robust accuracy at that eps (negative:
      the defense does harm; NaN when that figure is missing), ``harm_low`` / ``harm_high`` its 95% paired
      bootstrap interval over samples (2,000 seeded resamples, percentile);
    - ``no_harm``: "established" when ``harm_low`` >= 0, else "not established" (None without a harm figure);
    - ``attacks`` (the attacks with rows within eps);
    - ``judge_gaps``: samples missing from a judge-draw partition of the tier that no earlier draw broke
      (the producer's rule says it may leave out only broken samples; 0 when all is well).
    """
    rows = _Rows(table, budgets)
    t = rows.table
    if NO_DEFENSE not in pipelines:
        pipelines = {NO_DEFENSE: GatedDefense(None, None), **pipelines}
    y = t.labels[rows.clean_rows]
    first_draw = ~np.isin(rows.attack, list(rows.draws))
    entries = {a: threat_of(t.metadata, a) for a in t.attacks if a != CLEAN}
    records, robust = [], []
    for name, defense in pipelines.items():
        pred = np.asarray(defense.predict_table(t))
        pred_clean = pred[rows.clean_rows]
        # The unperturbed input is in every budget: a wrong clean answer breaks the sample everywhere.
        clean_broken = (pred_clean != y) & (pred_clean != ABSTAIN)
        attacked = pred[rows.rows]
        broken_row = (attacked != rows.labels[rows.rows]) & (attacked != ABSTAIN)
        gaps = rows.judge_gaps(name, broken_row, clean_broken)
        base = {"pipeline": name, "samples": rows.num_samples,
                "clean_accuracy": _share(pred_clean == y), "coverage": _share(pred_clean != ABSTAIN)}
        for tier, eps, mask in rows.tiers(name):
            broken = clean_broken.copy()
            broken[rows.sample[mask & broken_row]] = True
            single = clean_broken.copy()
            single[rows.sample[mask & first_draw & broken_row]] = True
            used = rows.used(mask)
            own = [a for a in rows.own(name, tier) if a in used and a not in rows.draws]
            # The query tier is measured on the samples its own partitions cover (see _Rows); the others on all.
            covered = np.ones(rows.num_samples, bool)
            if tier == "query":  # the samples of the query partitions that ran within this budget
                within = [a for a in own if (attack_eps(t.metadata, a) or 0.0) <= eps + BUDGET_TOLERANCE]
                covered[:] = False
                covered[rows.sample[np.isin(rows.attack, within)]] = True
                if not covered.any():
                    continue
            records.append({**base, "threat_model": tier, "eps": eps, "samples": int(covered.sum()),
                            "clean_accuracy": _share((pred_clean == y)[covered]),
                            "coverage": _share((pred_clean != ABSTAIN)[covered]),
                            "draws": max((int(entries[a].get("judge_draws", 1)) for a in own), default=1),
                            "robust_accuracy": _share(~broken[covered]), "robust_single_draw": _share(~single[covered]),
                            "attacks": used, "judge_gaps": sum(gaps.get(a, 0) for a in used)})
            robust.append(~broken)
    frame = pd.DataFrame.from_records(records, columns=[
        "pipeline", "threat_model", "eps", "samples", "draws", "clean_accuracy", "coverage", "robust_accuracy",
        "robust_single_draw", "attacks", "judge_gaps"])
    return _with_intervals(frame, np.array(robust, dtype=bool).reshape(len(frame), rows.num_samples))


THREAT_COLUMNS = [
    "pipeline", "threat_model", "eps", "samples", "draws",
    "clean_accuracy", "clean_accuracy_low", "clean_accuracy_high", "coverage", "coverage_low", "coverage_high",
    "robust_accuracy", "robust_accuracy_low", "robust_accuracy_high", "robust_single_draw",
    "harm", "harm_low", "harm_high", "no_harm", "attacks", "judge_gaps",
]


def fill_intervals(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Threat records (`to_records` of `threat_model_table`) with the exact binomial intervals of clean
    accuracy, coverage and robust accuracy filled in where missing (records saved before intervals existed);
    the harm interval cannot be recovered without the per-sample verdicts and stays absent."""
    out = [dict(r) for r in records]
    if not out:
        return out
    n = np.array([r.get("samples") or 0 for r in out], dtype=np.float64)
    for column in ("clean_accuracy", "coverage", "robust_accuracy"):
        value = np.array([np.nan if r.get(column) is None else r[column] for r in out], dtype=np.float64)
        low, high = binomial_interval(np.rint(value * n), n)
        for r, lo, hi, v in zip(out, low, high, value):
            if r.get(f"{column}_low") is None and v == v:
                r[f"{column}_low"], r[f"{column}_high"] = float(lo), float(hi)
    return out


def _with_intervals(frame: pd.DataFrame, robust: np.ndarray) -> pd.DataFrame:
    """`frame` with the binomial intervals of its rates, harm and its paired-bootstrap interval, the no-harm
    verdict, in `THREAT_COLUMNS` order. robust: (len(frame), samples) bool, each row's robust samples."""
    n = frame["samples"].to_numpy(np.float64)
    for column in ("clean_accuracy", "coverage", "robust_accuracy"):
        k = np.rint(frame[column].to_numpy(np.float64) * n)
        frame[f"{column}_low"], frame[f"{column}_high"] = binomial_interval(k, n)
    bare_rows = np.flatnonzero((frame["pipeline"] == NO_DEFENSE).to_numpy()
                               & (frame["threat_model"] == "adaptive").to_numpy())
    bare = {float(frame.at[i, "eps"]): i for i in bare_rows}
    reference = np.array([bare.get(float(e), -1) for e in frame["eps"]], dtype=np.int64)
    has = reference >= 0
    frame["harm"] = np.nan
    frame["harm_low"], frame["harm_high"] = np.nan, np.nan
    if has.any():
        frame.loc[has, "harm"] = (frame["robust_accuracy"].to_numpy()[has]
                                  - frame["robust_accuracy"].to_numpy()[reference[has]])
        low, high = paired_bootstrap_interval(robust[has], robust[reference[has]])
        frame.loc[has, "harm_low"], frame.loc[has, "harm_high"] = low, high
    # A figure over a subset of the samples (the query tier) has no paired difference with the bare model's.
    subset = frame["samples"].to_numpy() < robust.shape[1]
    frame.loc[subset, ["harm", "harm_low", "harm_high"]] = np.nan
    frame["no_harm"] = np.where(frame["harm_low"].to_numpy() >= 0, "established", "not established")
    frame["no_harm"] = frame["no_harm"].where(frame["harm"].notna(), None)
    return frame[THREAT_COLUMNS]


def detector_miss_table(
    table: LogitTable,
    detectors: Mapping[str, Detector],
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    fprs: Sequence[float] = (0.01, 0.05),
) -> pd.DataFrame:
    """Share of successful attacks each detector does not flag, per detector x threat model x budget.

    A successful attack is an attacked row within the budget whose clean row the bare model gets right
    and which the bare model gets wrong. Detectors are keyed by the name of the pipeline they serve:
    surrogate and adaptive attacks count when their ``target`` is that name (tiers as in
    `threat_model_table`).

    Returns
    -------
    Long-form DataFrame: ``detector``, ``kind``, ``threat_model``, ``eps``, ``successful`` (rows),
    ``fpr`` (the detector's own target FPR), ``missed`` (at its own threshold), ``missed_at_1``,
    ``missed_at_5`` (recalibrated on its clean calibration scores to 1% and 5% FPR, `Detector.with_fpr`;
    one column per entry of `fprs`) and ``attacks``. Shares are NaN when no attack succeeded.
    """
    rows = _Rows(table, budgets)
    records = []
    for name, detector in detectors.items():
        scores = np.asarray(detector.score_table(rows.table))[rows.rows]
        thresholds = {"missed": detector.threshold_,
                      **{_miss_column(f): detector.with_fpr(f).threshold_ for f in fprs}}
        for tier, eps, mask in rows.tiers(name):
            hit = scores[mask & rows.successful]
            records.append({"detector": name, "kind": detector.kind, "threat_model": tier, "eps": eps,
                            "successful": int(hit.size), "fpr": detector.fpr,
                            **{col: _share(hit <= th) for col, th in thresholds.items()},
                            "attacks": rows.used(mask)})
    columns = ["detector", "kind", "threat_model", "eps", "successful", "fpr", "missed",
               *(_miss_column(f) for f in fprs), "attacks"]
    return pd.DataFrame.from_records(records, columns=columns)


def _miss_column(fpr: float) -> str:
    return f"missed_at_{100 * fpr:g}".replace(".", "_")


def _share(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else float("nan")


# ---------------------------------------------------------------------------------------------
# Output


def to_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready records of a result frame (NaN becomes None)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
            for record in frame.to_dict(orient="records")]


