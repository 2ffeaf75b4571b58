"""Detectors of attacked logits. Every detector follows `Detector`'s contract: `fit(table)` returns
self, `score(table)` is higher for more likely adversarial rows, `predict(table)` flags rows above a
threshold calibrated on clean rows to a target false-positive rate, and `save`/`load_detector` use
plain arrays only.

Kinds: ``msp``, ``maxlogit``, ``energy``, ``nonme`` (baselines, one logit vector), ``odds`` (noise
queries) and ``odds-single`` (none), ``learned`` and ``learned-noisy``.
"""

from __future__ import annotations

from typing import Any

from ..errors import LogitguardError
from .base import REGISTRY, Detector, load_detector
from .baselines import EnergyDetector, MaxLogitDetector, MSPDetector, NonMEDetector
from .learned import LearnedDetector, NoisyLearnedDetector
from .odds import OddsTest, SingleShotOddsTest

KINDS = tuple(REGISTRY)


def make_detector(kind: str, **params: Any) -> Detector:
    """A new detector of `kind` (one of `KINDS`) with `params`."""
    if kind not in REGISTRY:
        raise LogitguardError(f"unknown detector kind {kind!r}; choose from {', '.join(KINDS)}")
    return REGISTRY[kind](**params)


__all__ = [
    "KINDS", "Detector", "EnergyDetector", "LearnedDetector", "MSPDetector", "MaxLogitDetector", "NonMEDetector",
    "NoisyLearnedDetector", "OddsTest", "SingleShotOddsTest", "load_detector", "make_detector",
]
