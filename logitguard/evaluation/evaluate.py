"""Evaluation protocols for defenses: accuracy tables (seed Tables 1–2), the transfer matrix (Table 3)
and the clean-vs-robust trade-off over ``p_clean``.

A *defense* here is anything with ``predict_table(table) -> labels (N,)``: a fitted `LogitCorrector`,
or a `GatedDefense`, whose label may be `ABSTAIN` (-1, the row is rejected). "none" (the model's own
argmax) is always evaluated beside them. Results are long-form DataFrames, so they filter, pivot and
serialise without special cases.

Abstentions are counted as docs/threat-models.md states once for the whole project: a rejected attacked
row counts as defended, a rejected clean row as an error, and ``coverage`` (the share of clean rows not
rejected) is reported beside clean accuracy. The figures here are for *oblivious* attacks unless the
table's ``threat`` metadata says otherwise; `logitguard.evaluation.threat` gives the per-threat-model worst case.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ..defenses.decision import flag
from ..defenses.corrector import LogitCorrector
from ..defenses.detectors import Detector
from ..defenses.gated import GatedDefense
from ..errors import LogitguardError
from .metrics import (attack_success_rate, clean_accuracy, coverage, detection_metrics, robust_accuracy,
                      successful_attack, tpr_at_fpr)
from ..tables import CLEAN, LogitTable, RowKeys, pair_rows, require_one_split
from ..tables.threat import NO_DEFENSE

METRICS = ("clean_accuracy", "coverage", "robust_accuracy", "attack_success_rate")


class Defense(Protocol):
    def predict_table(self, table: LogitTable) -> np.ndarray: ...


def evaluate(
    table: LogitTable,
    defenses: Mapping[str, Defense] | None = None,
    *,
    attacks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Clean and attacked accuracy without and with each defense, on every row of `table` (the full set) and
    the selected set. The rows must be of one split (select them first: ``table.select(split="test")``).

    The *selected* set holds the samples the undefended model classifies correctly when clean (seed
    Table 2). Rows are aligned clean/attacked pairs of each attack (see `pair`).

    Returns
    -------
    DataFrame with one row per (attack, subset, defense): columns ``attack``, ``subset`` ("full" or
    "selected"), ``defense`` ("none" first), ``samples``, ``clean_accuracy``, ``coverage``,
    ``robust_accuracy`` and ``attack_success_rate``, with abstentions counted as in
    docs/threat-models.md.
    """
    check_defenses(defenses or {})
    attacks = select_attacks(table, attacks)
    table = _only(table, attacks)
    defenses = {NO_DEFENSE: GatedDefense(None, None), **(defenses or {})}
    predictions = {name: np.asarray(defense.predict_table(table)) for name, defense in defenses.items()}
    return evaluation_records(RowKeys.of(table, model_label=table.logits.argmax(axis=1)), predictions, attacks)


def check_defenses(defenses: Mapping[str, Any]) -> None:
    """Refuse a detector where labels are expected: a detector flags rows, it does not label them (its flags
    read as labels would score as accuracy). Wrap it: ``GatedDefense(detector, None, on_flag="reject")``."""
    for name, defense in defenses.items():
        if isinstance(defense, Detector):
            raise LogitguardError(f"defense {name!r} is a detector: it flags rows and gives no labels; evaluate "
                                  "GatedDefense(detector, None, on_flag='reject') (or a detector with a corrector), "
                                  "or score it with detection_table")


def evaluation_records(rows: RowKeys, predictions: Mapping[str, np.ndarray], attacks: Sequence[str]) -> pd.DataFrame:
    """`evaluate`'s result from per-row labels: `predictions` maps each defense name ("none" first) to its
    labels (N,) for every row of `rows` (`ABSTAIN` where rejected); ``rows.values["model_label"]`` is the
    model's own argmax (it defines the selected set). What a streamed pass computes, batch by batch."""
    records = []
    for attack in attacks:
        clean_rows, attacked_rows = pair_rows(rows, attack)
        labels = rows.labels[clean_rows]
        selected = rows.values["model_label"][clean_rows] == labels
        for name, prediction in predictions.items():
            pred_clean, pred_attacked = prediction[clean_rows], prediction[attacked_rows]
            for subset, rows_ in (("full", slice(None)), ("selected", selected)):
                records.append({
                    "attack": attack, "subset": subset, "defense": name, "samples": int(labels[rows_].size),
                    "clean_accuracy": clean_accuracy(pred_clean[rows_], labels[rows_]),
                    "coverage": coverage(pred_clean[rows_]),
                    "robust_accuracy": robust_accuracy(pred_attacked[rows_], labels[rows_]),
                    "attack_success_rate": attack_success_rate(pred_clean[rows_], pred_attacked[rows_], labels[rows_]),
                })
    return pd.DataFrame.from_records(records)


def _only(table: LogitTable, attacks: Sequence[str]) -> LogitTable:
    """The clean rows and those of `attacks` (the table itself when it has no others)."""
    if CLEAN not in table.attacks or set(table.attacks) == {CLEAN, *attacks}:
        return table
    return table.select(attacks=[CLEAN, *attacks])


def detection_table(
    table: LogitTable,
    detectors: Mapping[str, Detector],
    *,
    attacks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """AUROC, AUPR-in, AUPR-out and FPR at 95% TPR (pytorch-ood's names, each with ``_low`` / ``_high``, its
    95% stratified-bootstrap interval: `logitguard.evaluation.metrics.detection_metrics`), TPR at 1% and 5%
    FPR (with the FPR achieved) and the calibrated detector's rates.

    Negatives are all clean rows of `table` (of one split, as for `evaluate`). Positives are each attack's *successful* rows: the clean
    row is classified correctly and the attacked one is not. A failed attack leaves logits that are
    as good as clean, and counting it would penalise a detector for the attack's failure.
    ``detection_accuracy`` is the balanced accuracy, the mean of TPR and 1 − FPR at the detector's own
    calibrated threshold (``threshold_tpr``, ``threshold_fpr``).

    Returns one row per (detector, attack).
    """
    attacks = select_attacks(table, attacks)
    table = _only(table, attacks)
    scores = {name: detector.score_table(table) for name, detector in detectors.items()}
    thresholds = {name: detector.threshold_ for name, detector in detectors.items()}
    return detection_records(RowKeys.of(table, model_label=table.logits.argmax(axis=1)), scores, thresholds, attacks)


def detection_records(rows: RowKeys, scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float],
                      attacks: Sequence[str], *, intervals: bool = True) -> pd.DataFrame:
    """`detection_table`'s result from per-row scores: `scores` maps each detector name to its scores (N,)
    for every row of `rows`, `thresholds` to its calibrated threshold; ``rows.values["model_label"]`` is the
    model's argmax (it decides which attacks succeeded). What a streamed pass computes, batch by batch.
    Without `intervals` the bootstrap (`detection_metrics`) is skipped and the ``_low``/``_high`` columns are
    left out."""
    clean_index = np.flatnonzero(rows.attack == CLEAN)
    if not len(clean_index):
        rows.select(attacks=CLEAN)  # raises the TableError that names what the table has
    model_label = rows.values["model_label"]
    records = []
    for name, row_scores in scores.items():
        threshold = thresholds[name]
        clean_scores = row_scores[clean_index]
        clean_fpr = float(flag(clean_scores, threshold).mean())
        for attack in attacks:
            clean, attacked = pair_rows(rows, attack)
            hit = successful_attack(model_label[clean], model_label[attacked], rows.labels[clean])
            scores_ = row_scores[attacked][hit]
            tpr1, fpr1 = tpr_at_fpr(clean_scores, scores_, 0.01)
            tpr5, fpr5 = tpr_at_fpr(clean_scores, scores_, 0.05)
            threshold_tpr = float(flag(scores_, threshold).mean()) if scores_.size else float("nan")
            records.append({
                "detector": name, "attack": attack, "positives": int(hit.sum()), "negatives": len(clean_scores),
                **detection_metrics(clean_scores, scores_, intervals=intervals), "tpr_at_1": tpr1, "fpr_at_1": fpr1, "tpr_at_5": tpr5,
                "fpr_at_5": fpr5, "threshold_tpr": threshold_tpr, "threshold_fpr": clean_fpr,
                "detection_accuracy": (threshold_tpr + 1.0 - clean_fpr) / 2.0,
            })
    return pd.DataFrame.from_records(records)


def train_per_attack(
    table: LogitTable,
    attacks: Iterable[str],
    *,
    progress: bool = True,
    **params: Any,
) -> dict[str, LogitCorrector]:
    """One `LogitCorrector(**params)` per attack, each trained on that attack's rows of `table` alone (of one
    split: ``table.select(split="train")``)."""
    from tqdm.auto import tqdm

    attacks = list(attacks)
    correctors = {}
    for attack in tqdm(attacks, desc="correctors", unit="attack", disable=not progress):
        correctors[attack] = LogitCorrector(progress=progress, **params).fit_table(table, attack)
    return correctors


def transfer_matrix(
    table: LogitTable,
    defenses: Mapping[str, Defense],
    *,
    attacks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Accuracy of each defense (columns, e.g. "trained on pgd") on each attack's rows (rows; seed Table 3).

    The first row, "clean", is each defense's accuracy on the clean rows: what the transfer costs.
    Accuracy is over every row of `table` (of one split) for that attack (the full set, not the selected one);
    abstentions count as in docs/threat-models.md (an error on clean rows, defended on attacked rows).
    """
    attacks = select_attacks(table, attacks)
    matrix = pd.DataFrame(index=pd.Index([CLEAN, *attacks], name="evaluated on"),
                          columns=pd.Index(list(defenses), name="trained on"), dtype=float)
    for attack in matrix.index:
        rows = table.select(attacks=attack)
        for name, defense in defenses.items():
            accuracy = clean_accuracy if attack == CLEAN else robust_accuracy
            matrix.at[attack, name] = accuracy(defense.predict_table(rows), rows.labels)
    return matrix


def sweep_p_clean(
    train: LogitTable,
    test: LogitTable,
    attacks: str | Sequence[str],
    values: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9),
    *,
    progress: bool = True,
    **params: Any,
) -> pd.DataFrame:
    """Train one corrector per ``p_clean`` value on the rows of `train` and report the clean-vs-robust
    trade-off on those of `test` (each of one split: ``table.select(split="train")``, ``…"test"``).

    Returns a DataFrame indexed by ``p_clean`` with ``clean_accuracy`` and ``robust_accuracy`` (every row of
    `test`, attacked rows of `attacks` pooled).
    """
    from tqdm.auto import tqdm

    attacks = [attacks] if isinstance(attacks, str) else list(attacks)
    select_attacks(test, attacks)
    clean_rows, attacked_rows = test.select(attacks=CLEAN), test.select(attacks=attacks)
    records = []
    for p in tqdm(list(values), desc="p_clean sweep", disable=not progress):
        corrector = LogitCorrector(p_clean=p, progress=progress, **params)
        corrector.fit_table(train, attacks)
        records.append({
            "p_clean": p,
            "clean_accuracy": clean_accuracy(corrector.predict_table(clean_rows), clean_rows.labels),
            "robust_accuracy": robust_accuracy(corrector.predict_table(attacked_rows), attacked_rows.labels),
        })
    return pd.DataFrame.from_records(records).set_index("p_clean")


def select_attacks(table: LogitTable | RowKeys, attacks: Sequence[str] | None) -> list[str]:
    """The attacks to evaluate on the rows of `table` (default: every attack but clean).

    Raises `TableError` when the rows are of several splits (`require_one_split`), `LogitguardError` when
    labels are missing or an attack has no rows.
    """
    require_one_split(table, "evaluation")
    if not table.has_labels:
        raise LogitguardError("evaluation needs ground-truth labels, and some rows have none")
    available = [a for a in table.attacks if a != CLEAN]
    attacks = available if attacks is None else list(attacks)
    unknown = [a for a in attacks if a not in available]
    if unknown or not attacks:
        raise LogitguardError(f"no rows for attack(s) {unknown or attacks} in this table; it has {available}")
    return attacks
