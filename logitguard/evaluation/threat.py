"""Threat models: what an attacker knew, and robustness reported per threat model.

Vocabulary (docs/threat-models.md): every attack partition of a table records in the metadata key
``threat`` what its attacker had: ``oblivious`` (the model, not the defense), ``transfer`` (only a
substitute model), ``surrogate`` (the defense's algorithm and settings, and its own copy trained on other
data) or ``adaptive`` (the defense's files). A partition without an entry is ``oblivious``.

Evaluation: `threat_model_table` gives, per pipeline x threat model x L-inf budget, the *per-sample worst
case* over every attack of that tier: a sample counts as robust only when the pipeline is right on, or
rejects, every one of its rows from those attacks within the budget (and is right on, or rejects, its
clean row: the unperturbed input is in every budget). `detector_miss_table` gives the share of successful
attacks a detector lets through. Both are vectorised over rows; loops run over pipelines, tiers and
budgets only.

Torch-free at import.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..defenses.gated import GatedDefense
from ..errors import LogitguardError, TableError
from .metrics import ABSTAIN, successful_attack
from ..report.summary import percent, render_table
from ..tables import CLEAN, LogitTable

if TYPE_CHECKING:
    from ..defenses.detectors import Detector
    from .evaluate import Defense

THREAT_MODELS = ("oblivious", "transfer", "query", "surrogate", "adaptive")
# Report order: from the attacker who knows least about the deployed system to the one who knows most.
TIERS = ("transfer", "query", "oblivious", "surrogate", "adaptive")
DEFAULT_BUDGETS = (8 / 255, 16 / 255)
BUDGET_TOLERANCE = 1e-6  # linf is stored as float32: 8/255 reads back as 0.03137255
NO_DEFENSE = "none"

__all__ = [
    "BUDGET_TOLERANCE", "DEFAULT_BUDGETS", "NO_DEFENSE", "THREAT_MODELS", "TIERS", "attack_eps", "detector_miss_table",
    "file_sha256", "format_budget", "format_detector_misses", "format_threat_models", "parse_budgets",
    "threat_model_table", "threat_of", "tier_attacks", "to_records",
]


# ---------------------------------------------------------------------------------------------
# Vocabulary


def threat_of(metadata: Mapping[str, Any], attack: str) -> dict[str, Any]:
    """The threat entry of `attack` in table `metadata`, with ``model`` filled in (default ``oblivious``).

    Raises `TableError` when the entry is not an object or names an unknown threat model.
    """
    threat = metadata.get("threat") or {}
    if not isinstance(threat, Mapping):
        raise TableError(f"metadata 'threat' must be an object of attack name: entry, got {threat!r}")
    entry = threat.get(attack)
    if entry is None:
        entry = {}
    if not isinstance(entry, Mapping):
        raise TableError(f"metadata 'threat' for attack {attack!r} must be an object, got {entry!r}")
    out = {"model": "oblivious", **entry}
    if out["model"] not in THREAT_MODELS:
        raise TableError(f"metadata 'threat' for attack {attack!r}: unknown threat model {out['model']!r}; "
                         f"expected one of {', '.join(THREAT_MODELS)}")
    return out


def attack_eps(metadata: Mapping[str, Any], attack: str) -> float | None:
    """The L-inf budget `attack` ran with: its threat entry's ``eps``, else its parameters' (None: unbounded)."""
    eps = threat_of(metadata, attack).get("eps")
    if eps is None:
        eps = (metadata.get("attacks") or {}).get(attack, {}).get("eps")
    return float(eps) if isinstance(eps, (int, float)) else None


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of the file at `path` (read in 1 MiB blocks)."""
    path = Path(path)
    if not path.is_file():
        raise LogitguardError(f"no such file: {path}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tier_attacks(metadata: Mapping[str, Any], attacks: Sequence[str], pipeline: str) -> dict[str, list[str]]:
    """The attacks each tier takes its worst case over, for the pipeline named `pipeline`.

    transfer = transfer attacks; oblivious = oblivious attacks; surrogate = oblivious + surrogate attacks
    whose ``target`` is `pipeline`; adaptive = surrogate tier + adaptive attacks whose ``target`` is
    `pipeline`. For the bare model ("none") every oblivious attack is adaptive: it aims at that model.
    A tier is left out when none of its *own* attacks (those not inherited from the tier below) is in the
    table: an "adaptive" figure made of oblivious attacks alone would claim what was never measured.
    """
    return {tier: every for tier, (every, _) in _tiers(metadata, attacks, pipeline).items()}


def _tiers(metadata: Mapping[str, Any], attacks: Sequence[str], pipeline: str) -> dict[str, tuple[list, list]]:
    """Per tier with attacks of its own: (every attack of the tier, its own attacks). query = the query attacks
    aimed at `pipeline`; adaptive also takes them in (see `tier_attacks`)."""
    models = {a: threat_of(metadata, a) for a in attacks if a != CLEAN}

    def of(model: str, aimed: bool = False) -> list[str]:
        return [a for a, t in models.items() if t["model"] == model and (not aimed or t.get("target") == pipeline)]

    oblivious = of("oblivious")
    surrogate, adaptive = of("surrogate", aimed=True), of("adaptive", aimed=True)
    query = of("query", aimed=True)
    bare = oblivious if pipeline == NO_DEFENSE else []  # the bare model's attacker always knows all of it
    parts = {"transfer": (of("transfer"), of("transfer")),
             "query": (query, query),
             "oblivious": (oblivious, oblivious),
             "surrogate": (oblivious + surrogate, bare + surrogate),
             # the attacker with the files can also query the deployed pipeline
             "adaptive": (oblivious + surrogate + query + adaptive, bare + adaptive)}
    return {tier: part for tier, part in parts.items() if part[1]}


# ---------------------------------------------------------------------------------------------
# Budgets


def parse_budgets(text: str) -> tuple[float, ...]:
    """``"8/255,16/255"`` or ``"0.03,0.06"`` -> budgets as floats; `LogitguardError` on anything else."""
    budgets = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise LogitguardError(f"budgets must be numbers or fractions such as 8/255, got {part!r}") from None
        if not value > 0:
            raise LogitguardError(f"budgets must be positive, got {part!r}")
        budgets.append(value)
    return tuple(budgets)


def format_budget(eps: float) -> str:
    """``8/255`` for a whole number of 8-bit grey levels, else the number (``0.1``)."""
    levels = eps * 255
    return f"{round(levels)}/255" if abs(levels - round(levels)) < 1e-6 and round(levels) > 0 else f"{eps:g}"


# ---------------------------------------------------------------------------------------------
# Evaluation


class _Rows:
    """What every pipeline's evaluation shares: the selected samples, their clean and attacked rows, and
    which attacked rows are within each budget."""

    def __init__(self, table: LogitTable, split: str | None, budgets: Sequence[float]) -> None:
        if split is not None:
            table = table.select(split=split)
        if not table.has_labels:
            raise LogitguardError("threat-model evaluation needs ground-truth labels, and some rows have none")
        if CLEAN not in table.attacks:
            raise LogitguardError(f"threat-model evaluation needs clean rows; the table has {table.attacks}")
        if not budgets:
            raise LogitguardError("give at least one budget")
        # Every tier is measured on the same samples: those with a row in every partition (attacks run on
        # fewer samples, such as the adaptive ones, set the sample set for all).
        keys = pd.DataFrame({"split": table.split, "sample_id": table.sample_id, "attack": table.attack})
        partitions = keys.groupby(["split", "sample_id"])["attack"].transform("nunique").to_numpy()
        if (partitions < len(table.attacks)).any():
            table = table.take(partitions == len(table.attacks))
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
        size = self._size()
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
        for tier, (every, own) in _tiers(self.table.metadata, self.table.attacks, name).items():
            in_tier, in_own = np.isin(self.attack, every), np.isin(self.attack, own)
            for eps in self.budgets:
                if (in_own & self.in_budget[eps]).any():
                    yield tier, eps, in_tier & self.in_budget[eps]

    def used(self, mask: np.ndarray) -> list[str]:
        return sorted(np.unique(self.attack[mask]).tolist())


def threat_model_table(
    table: LogitTable,
    pipelines: Mapping[str, Defense],
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    split: str | None = "test",
) -> pd.DataFrame:
    """Clean accuracy, coverage and per-sample worst-case robust accuracy per pipeline x threat model x budget.

    Over the *selected* samples (the bare model is right on the clean row) that have a row in every
    partition of the split, so every tier and pipeline is measured on the same samples. A sample is robust under a
    tier at budget eps when the pipeline is right or abstains on every row of that sample from the tier's
    attacks (`tier_attacks`) whose ``linf`` <= eps + 1e-6, and on its clean row. Rows without ``linf``
    use the attack's metadata eps; an unbounded attack with neither is in every budget. The bare model is
    added as "none" when `pipelines` has no pipeline of that name.

    Returns
    -------
    Long-form DataFrame, one row per (pipeline, threat_model, eps) where the tier has at least one row
    of its own attacks within eps (no "adaptive" row without an adaptive attack aimed at the pipeline): ``pipeline``, ``threat_model``, ``eps``, ``samples``, ``clean_accuracy``, ``coverage``,
    ``robust_accuracy``, ``attacks`` (the attacks with rows within eps) and ``harm`` (``robust_accuracy``
    minus the "none" pipeline's adaptive robust accuracy at that eps: negative means the defense does
    harm; NaN when that figure is missing).
    """
    rows = _Rows(table, split, budgets)
    t = rows.table
    if NO_DEFENSE not in pipelines:
        pipelines = {NO_DEFENSE: GatedDefense(None, None), **pipelines}
    y = t.labels[rows.clean_rows]
    records = []
    for name, defense in pipelines.items():
        pred = np.asarray(defense.predict_table(t))
        pred_clean = pred[rows.clean_rows]
        # The unperturbed input is in every budget: a wrong clean answer breaks the sample everywhere.
        clean_broken = (pred_clean != y) & (pred_clean != ABSTAIN)
        attacked = pred[rows.rows]
        broken_row = (attacked != rows.labels[rows.rows]) & (attacked != ABSTAIN)
        base = {"pipeline": name, "samples": rows.num_samples,
                "clean_accuracy": _share(pred_clean == y), "coverage": _share(pred_clean != ABSTAIN)}
        for tier, eps, mask in rows.tiers(name):
            broken = clean_broken.copy()
            broken[rows.sample[mask & broken_row]] = True
            records.append({**base, "threat_model": tier, "eps": eps, "robust_accuracy": _share(~broken),
                            "attacks": rows.used(mask)})
    columns = ["pipeline", "threat_model", "eps", "samples", "clean_accuracy", "coverage", "robust_accuracy",
               "attacks"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    reference = frame[(frame["pipeline"] == NO_DEFENSE) & (frame["threat_model"] == "adaptive")]
    bare = dict(zip(reference["eps"], reference["robust_accuracy"]))
    frame["harm"] = frame["robust_accuracy"] - frame["eps"].map(bare).astype(float)
    return frame


def detector_miss_table(
    table: LogitTable,
    detectors: Mapping[str, Detector],
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    split: str | None = "test",
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
    rows = _Rows(table, split, budgets)
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


def format_threat_models(results: pd.DataFrame) -> str:
    """Plain text: one line per pipeline x budget; clean accuracy, coverage and robust accuracy per tier."""
    tiers = [t for t in TIERS if t in set(results["threat_model"])]
    headers = ["pipeline", "eps", "samples", "clean", "coverage", *tiers, "harm"]
    lines = []
    for (name, eps), group in results.groupby(["pipeline", "eps"], sort=False):
        by = group.set_index("threat_model")
        harm = by["harm"].get("adaptive", float("nan"))
        first = group.iloc[0]
        lines.append([name, format_budget(eps), str(first["samples"]), percent(first["clean_accuracy"]),
                      percent(first["coverage"]),
                      *(percent(by["robust_accuracy"].get(t)) for t in tiers),
                      "-" if harm != harm else f"{100 * harm:+.1f}"])
    return "\n".join([
        "Robust accuracy per threat model (selected set: samples the bare model gets right when clean)",
        *render_table(headers, lines, left=2),
        "(per-sample worst case over the tier's attacks within eps; a rejected attacked row counts as defended,",
        " a rejected clean row as an error; harm: adaptive minus the undefended model's adaptive, in points;",
        " see docs/threat-models.md)",
    ])


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
