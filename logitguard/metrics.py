"""Metrics on predicted labels, named as in RobustBench and ART.

All take int label arrays of shape (N,) and return a float in [0, 1] (NaN when undefined).
"""

from __future__ import annotations

import numpy as np


def clean_accuracy(pred_clean: np.ndarray, labels: np.ndarray) -> float:
    """Share of clean rows predicted correctly."""
    return _mean(np.asarray(pred_clean) == np.asarray(labels))


def robust_accuracy(pred_attacked: np.ndarray, labels: np.ndarray) -> float:
    """Share of attacked rows still predicted correctly."""
    return _mean(np.asarray(pred_attacked) == np.asarray(labels))


def attack_success_rate(pred_clean: np.ndarray, pred_attacked: np.ndarray, labels: np.ndarray) -> float:
    """Among rows predicted correctly when clean, the share predicted wrongly once attacked."""
    right = np.asarray(pred_clean) == np.asarray(labels)
    return _mean(np.asarray(pred_attacked)[right] != np.asarray(labels)[right])


def _mean(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else float("nan")
