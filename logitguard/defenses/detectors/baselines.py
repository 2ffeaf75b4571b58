"""Baseline detectors that read one logit vector and learn nothing but a threshold.

The scores are written once, on the array API, in `logitguard.defenses.math.baselines`.

Each score is negated where the source measures "normality", so that higher means more adversarial.
"""

from __future__ import annotations

import numpy as np

from ..math.baselines import energy_score, max_logit_score, msp_score, nonme_score, softmax
from .base import Detector

__all__ = ["EnergyDetector", "MSPDetector", "MaxLogitDetector", "NonMEDetector", "energy_score", "max_logit_score",
           "msp_score", "nonme_score", "softmax"]


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
