"""What a defense decides for a row, and the rules every detector and engine share.

- `ABSTAIN` (-1): the label of a row a defense rejects.
- `Decision`: the per-row outcome every apply path returns (model label, flag, score, final label).
- `flag`: the one flag rule. A score above the threshold is flagged, and so is a score that is not a
  number (fail closed: a detector that cannot score a row must not wave it through).
- `threshold_at_fpr`: the threshold that flags at most a given share of clean rows.
- `defended` / `successful_attack`: the one definition of a defended row and of a successful attack
  (detector positives, attack success rates, the producer's ``success`` column).

NumPy only, no other import from the project: every layer above may use these.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

ABSTAIN = -1

__all__ = ["ABSTAIN", "Decision", "defended", "flag", "successful_attack", "threshold_at_fpr"]


class Decision(NamedTuple):
    """What a defense decided for each of N rows (arrays of shape (N,))."""

    model_label: np.ndarray  # int64: the model's own argmax
    flagged: np.ndarray  # bool: the detector's verdict (every row without a detector, none for the bare model)
    score: np.ndarray  # float64: the detector's score, higher = more likely adversarial (NaN without a detector)
    label: np.ndarray  # int64: the label to act on; ABSTAIN (-1) where the row is rejected


def flag(scores: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) bool: ``score > threshold``, or the score is NaN (fails closed). Any array API array (a torch
    tensor stays one); other sequences become NumPy arrays."""
    if not hasattr(scores, "__array_namespace__") and type(scores).__module__.split(".")[0] != "torch":
        scores = np.asarray(scores)
    return ~(scores <= threshold)


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float) -> float:
    """The lowest threshold t such that at most a share `fpr` of `clean_scores` exceed it (flag: score > t)."""
    ordered = np.sort(np.asarray(clean_scores, dtype=np.float64))
    keep = max(1, int(np.ceil(len(ordered) * (1.0 - fpr) - 1e-9)))  # rows that must stay at or below t
    return float(ordered[keep - 1])


def defended(pred_attacked: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per attacked row (N,) bool: predicted correctly, or rejected."""
    pred_attacked = np.asarray(pred_attacked)
    return (pred_attacked == np.asarray(labels)) | (pred_attacked == ABSTAIN)


def successful_attack(pred_clean: np.ndarray, pred_attacked: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per aligned clean/attacked pair (N,) bool: the clean row is predicted correctly and the attacked row
    is neither predicted correctly nor rejected."""
    return (np.asarray(pred_clean) == np.asarray(labels)) & ~defended(pred_attacked, labels)
