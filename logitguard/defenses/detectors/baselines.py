"""Baseline detectors that read one logit vector and learn nothing but a threshold.

Each score is negated where the source measures "normality", so that higher means more adversarial.
"""

from __future__ import annotations

import numpy as np

from .base import Detector


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (N, C) float64 of logits (N, C), shifted by each row's maximum so it cannot overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z, dtype=np.float64)
    return e / e.sum(axis=1, keepdims=True)


def msp_score(logits: np.ndarray) -> np.ndarray:
    """Negated maximum softmax probability (Hendrycks & Gimpel): low confidence looks adversarial."""
    return -softmax(logits).max(axis=1)


def max_logit_score(logits: np.ndarray) -> np.ndarray:
    """Negated maximum logit."""
    return -logits.max(axis=1).astype(np.float64)


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Energy at temperature 1, -logsumexp(logits) (Liu et al. 2020): high energy looks adversarial."""
    m = logits.max(axis=1).astype(np.float64)
    return -(m + np.log(np.exp(logits - m[:, None], dtype=np.float64).sum(axis=1)))


def nonme_score(logits: np.ndarray) -> np.ndarray:
    """Negated non-maximal entropy (Pang et al. 2018, seed 001): the entropy of the softmax entries other
    than the largest, renormalised to sum to 1. Adversarial rows have *lower* non-ME, hence the sign."""
    p = softmax(logits)
    p[np.arange(len(p)), p.argmax(axis=1)] = 0.0
    p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-300)
    return (p * np.log(np.maximum(p, 1e-300))).sum(axis=1)  # = -entropy


class _LogitScoreDetector(Detector):
    """A fixed score of the logits; subclasses name it in `_function`."""

    _function: staticmethod

    def _scores(self, logits: np.ndarray, noisy: np.ndarray | None) -> np.ndarray:
        return type(self)._function(logits)


class MSPDetector(_LogitScoreDetector):
    """Maximum softmax probability baseline."""
    kind = "msp"
    _function = staticmethod(msp_score)


class MaxLogitDetector(_LogitScoreDetector):
    """Maximum-logit baseline."""
    kind = "maxlogit"
    _function = staticmethod(max_logit_score)


class EnergyDetector(_LogitScoreDetector):
    """Energy-score baseline."""
    kind = "energy"
    _function = staticmethod(energy_score)


class NonMEDetector(_LogitScoreDetector):
    """Non-maximal-entropy baseline."""
    kind = "nonme"
    _function = staticmethod(nonme_score)
