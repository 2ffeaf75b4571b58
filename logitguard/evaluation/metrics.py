"""Metrics on predicted labels, named as in RobustBench and ART.

All take int label arrays of shape (N,) and return a float in [0, 1] (NaN when undefined).

A defense may abstain: its label is then `ABSTAIN` (-1). The accounting (docs/threat-models.md) is
the same everywhere: a rejected clean row is an error, a rejected attacked row is defended, and
`coverage` (the share of clean rows not rejected) is reported beside clean accuracy.
"""

from __future__ import annotations

import numpy as np

ABSTAIN = -1  # the label of a row a defense rejects (re-exported by logitguard.defenses.gated)


def clean_accuracy(pred_clean: np.ndarray, labels: np.ndarray) -> float:
    """Share of clean rows predicted correctly (a rejected clean row is an error)."""
    return _mean(np.asarray(pred_clean) == np.asarray(labels))


def coverage(pred_clean: np.ndarray) -> float:
    """Share of clean rows the defense does not reject."""
    return _mean(np.asarray(pred_clean) != ABSTAIN)


def defended(pred_attacked: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per attacked row (N,) bool: predicted correctly, or rejected."""
    pred_attacked = np.asarray(pred_attacked)
    return (pred_attacked == np.asarray(labels)) | (pred_attacked == ABSTAIN)


def robust_accuracy(pred_attacked: np.ndarray, labels: np.ndarray) -> float:
    """Share of attacked rows still predicted correctly or rejected (`defended`)."""
    return _mean(defended(pred_attacked, labels))


def successful_attack(pred_clean: np.ndarray, pred_attacked: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per aligned clean/attacked pair (N,) bool: the clean row is predicted correctly and the attacked row
    is neither predicted correctly nor rejected. The one definition of a successful attack in the project
    (detector positives, attack success rates, the producer's ``success`` column)."""
    return (np.asarray(pred_clean) == np.asarray(labels)) & ~defended(pred_attacked, labels)


def attack_success_rate(pred_clean: np.ndarray, pred_attacked: np.ndarray, labels: np.ndarray) -> float:
    """Among rows predicted correctly when clean, the share of `successful_attack`s."""
    right = np.asarray(pred_clean) == np.asarray(labels)
    return _mean(successful_attack(pred_clean, pred_attacked, labels)[right])


def _mean(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else float("nan")


# -- detection ---------------------------------------------------------------------------------
# Scores: higher = more likely adversarial. Negatives are clean rows, positives attacked rows.


def auroc(clean_scores: np.ndarray, attacked_scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance that an attacked row outscores a clean one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    clean_scores, attacked_scores = np.asarray(clean_scores), np.asarray(attacked_scores)
    if not clean_scores.size or not attacked_scores.size:
        return float("nan")
    truth = np.r_[np.zeros(clean_scores.size), np.ones(attacked_scores.size)]
    return float(roc_auc_score(truth, np.r_[clean_scores, attacked_scores]))


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float) -> float:
    """The lowest threshold t such that at most a share `fpr` of `clean_scores` exceed it (flag: score > t)."""
    ordered = np.sort(np.asarray(clean_scores, dtype=np.float64))
    keep = max(1, int(np.ceil(len(ordered) * (1.0 - fpr) - 1e-9)))  # rows that must stay at or below t
    return float(ordered[keep - 1])


def tpr_at_fpr(clean_scores: np.ndarray, attacked_scores: np.ndarray, fpr: float) -> tuple[float, float]:
    """(TPR, achieved FPR) at the threshold flagging at most `fpr` of the clean rows.

    The achieved FPR can fall below the target when scores tie; it is returned so reports can show it.
    """
    clean_scores, attacked_scores = np.asarray(clean_scores), np.asarray(attacked_scores)
    if not clean_scores.size or not attacked_scores.size:
        return float("nan"), float("nan")
    threshold = threshold_at_fpr(clean_scores, fpr)
    return float((attacked_scores > threshold).mean()), float((clean_scores > threshold).mean())
