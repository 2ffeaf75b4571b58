"""Metrics on predicted labels, named as in RobustBench and ART.

All take int label arrays of shape (N,) and return a float in [0, 1] (NaN when undefined).

A defense may abstain: its label is then `ABSTAIN` (-1). The accounting (docs/threat-models.md) is
the same everywhere: a rejected clean row is an error, a rejected attacked row is defended, and
`coverage` (the share of clean rows not rejected) is reported beside clean accuracy.
"""

from __future__ import annotations

import numpy as np

from ..defenses.decision import ABSTAIN, defended, flag, successful_attack, threshold_at_fpr


def clean_accuracy(pred_clean: np.ndarray, labels: np.ndarray) -> float:
    """Share of clean rows predicted correctly (a rejected clean row is an error)."""
    return _mean(np.asarray(pred_clean) == np.asarray(labels))


def coverage(pred_clean: np.ndarray) -> float:
    """Share of clean rows the defense does not reject."""
    return _mean(np.asarray(pred_clean) != ABSTAIN)


def robust_accuracy(pred_attacked: np.ndarray, labels: np.ndarray) -> float:
    """Share of attacked rows still predicted correctly or rejected (`defended`)."""
    return _mean(defended(pred_attacked, labels))


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


def tpr_at_fpr(clean_scores: np.ndarray, attacked_scores: np.ndarray, fpr: float) -> tuple[float, float]:
    """(TPR, achieved FPR) at the threshold flagging at most `fpr` of the clean rows.

    The achieved FPR can fall below the target when scores tie; it is returned so reports can show it.
    """
    clean_scores, attacked_scores = np.asarray(clean_scores), np.asarray(attacked_scores)
    if not clean_scores.size or not attacked_scores.size:
        return float("nan"), float("nan")
    threshold = threshold_at_fpr(clean_scores, fpr)
    return float(flag(attacked_scores, threshold).mean()), float(flag(clean_scores, threshold).mean())


# -- detection metrics as pytorch-ood names them ------------------------------------------------
# Attacked rows ("out") are the positives of AUROC, AUPR-out and FPR@95%TPR; AUPR-in takes the clean rows
# ("in") as positives and the negated score. FPR at 95% TPR: the share of clean rows flagged at the highest
# threshold that flags at least 95% of the attacked rows.

DETECTION_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr")


class _Cumulative:
    """Weighted counts of rows at or above thresholds: one sort and one cumulative sum (b, N + 1), read at as
    many thresholds as needed."""

    def __init__(self, scores: np.ndarray, weights: np.ndarray) -> None:
        order = np.argsort(-scores, kind="stable")
        self.descending = -scores[order]  # ascending negated scores, for searchsorted
        self.cum = np.zeros((weights.shape[0], len(scores) + 1))
        np.cumsum(weights[:, order], axis=1, out=self.cum[:, 1:])

    def at(self, thresholds: np.ndarray, strict: bool = False) -> np.ndarray:
        """(b, T): weight of rows with score >= each threshold (> when `strict`)."""
        return self.cum[:, np.searchsorted(self.descending, -thresholds, side="left" if strict else "right")]


def _average_precision(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Average precision (sklearn's: sum of recall step x precision) from (b, T) counts at the thresholds
    that hold positives, in the order they are passed (most confident first)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        step = np.diff(tp, axis=1, prepend=0.0) / tp[:, -1:]
        return (step * np.where(tp + fp > 0, tp / (tp + fp), 0.0)).sum(axis=1)


def weighted_detection_metrics(clean_scores: np.ndarray, attacked_scores: np.ndarray, clean_weights: np.ndarray,
                               attacked_weights: np.ndarray, tpr: float = 0.95) -> np.ndarray:
    """`DETECTION_METRICS` under b weightings of the rows at once: weights (b, N0) and (b, N1) -> (b, 4).

    With all weights 1 these are the plain metrics; with bootstrap counts, the resamples' metrics. Every
    curve changes only at thresholds that hold a positive, so only those are visited: (b, N1) work for
    AUROC, AUPR-out and FPR@TPR, (b, N0) for AUPR-in."""
    clean, attacked = np.asarray(clean_scores, np.float64), np.asarray(attacked_scores, np.float64)
    w0, w1 = np.atleast_2d(clean_weights), np.atleast_2d(attacked_weights)
    up = np.unique(attacked)[::-1]  # attacked scores, highest first
    neg, pos = _Cumulative(clean, w0), _Cumulative(attacked, w1)
    tp = pos.at(up)  # attacked rows flagged at each threshold (b, T1)
    fp = neg.at(up)  # clean rows flagged (score >= t)
    fp_over = neg.at(up, strict=True)  # clean rows above t (ties count half for AUROC)
    p, n = tp[:, -1:], neg.cum[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        step = np.diff(tp, axis=1, prepend=0.0)
        auroc_ = (step * (n - (fp + fp_over) / 2)).sum(axis=1) / (p * n)[:, 0]
        first = np.argmax(tp / p >= tpr - 1e-12, axis=1)  # the highest threshold reaching the TPR
        fpr_at = fp[np.arange(len(fp)), first] / n[:, 0]
        # AUPR-in: clean rows are the positives of the negated score; thresholds = clean scores, lowest first.
        down = np.unique(clean)
        kept_clean = n - neg.at(down, strict=True)  # clean rows with score <= t
        kept_attacked = p - pos.at(down, strict=True)
    return np.stack([auroc_, _average_precision(kept_clean, kept_attacked), _average_precision(tp, fp), fpr_at],
                    axis=1)


def detection_metrics(clean_scores: np.ndarray, attacked_scores: np.ndarray, *, intervals: bool = True,
                      resamples: int | None = None, seed: int | None = None) -> dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR at 95% TPR of a detector (higher score = more likely attacked), each
    with ``_low`` / ``_high``: the 95% percentile interval of a bootstrap over rows stratified by class
    (`logitguard.evaluation.intervals`). NaN when either side is empty; no interval keys without `intervals`."""
    from .intervals import RESAMPLES, SEED, stratified_bootstrap_interval

    clean_scores = np.asarray(clean_scores, np.float64).ravel()
    attacked_scores = np.asarray(attacked_scores, np.float64).ravel()
    n0, n1 = clean_scores.size, attacked_scores.size
    if n0 and n1:
        point = weighted_detection_metrics(clean_scores, attacked_scores, np.ones((1, n0)), np.ones((1, n1)))[0]
    else:
        point = np.full(len(DETECTION_METRICS), np.nan)
    out = {name: float(v) for name, v in zip(DETECTION_METRICS, point)}
    if intervals:
        if n0 and n1:
            low, high = stratified_bootstrap_interval(
                lambda w0, w1: weighted_detection_metrics(clean_scores, attacked_scores, w0, w1), n0, n1,
                resamples=RESAMPLES if resamples is None else resamples, seed=SEED if seed is None else seed)
        else:
            low = high = np.full(len(DETECTION_METRICS), np.nan)
        for name, lo, hi in zip(DETECTION_METRICS, low, high):
            out[f"{name}_low"], out[f"{name}_high"] = float(lo), float(hi)
    return out
