"""Detectors of attacked logits. Every detector follows `Detector`'s contract (arrays first, with
``*_table`` wrappers): `fit(logits, attacked, …)` returns self, `score_samples(logits, noisy_logits)` is
higher for more likely adversarial rows, `flag` flags rows above a threshold calibrated on clean rows
to a target false-positive rate, and `save`/`load_detector` use plain arrays only.

Kinds: ``msp``, ``maxlogit``, ``energy``, ``nonme`` (baselines, one logit vector), ``odds`` (noise
queries) and ``odds-single`` (none), ``learned``, ``learned-noisy`` and ``learned-ranked``; and two that read
another table column (`Detector.input_column`, passed as ``features=``): ``kdensity`` (penultimate features,
K-density) and ``insen`` (input-sensitivity statistics). `LOGIT_KINDS` are the kinds that need logits (and noise
queries) only: what a deployable guard accepts.
"""

from __future__ import annotations

from typing import Any

from ..detector_kinds import DETECTOR_KINDS
from ...errors import LogitguardError
from ..estimator import REGISTRY
from .base import Detector, load_detector
from .baselines import EnergyDetector, MaxLogitDetector, MSPDetector, NonMEDetector
from .insen import InsenDetector
from .kdensity import KDensityDetector
from .learned import LearnedDetector, NoisyLearnedDetector, RankedNoisyLearnedDetector
from .odds import OddsCorrector, OddsTest, SingleShotOddsTest

KINDS = DETECTOR_KINDS
if tuple(kind for kind, cls in REGISTRY.items() if issubclass(cls, Detector)) != KINDS:
    raise RuntimeError("logitguard.defenses.detector_kinds.DETECTOR_KINDS must list every registered detector kind, in "
                       "registration order")
LOGIT_KINDS = tuple(kind for kind in KINDS if REGISTRY[kind].input_column is None)


def make_detector(kind: str, **params: Any) -> Detector:
    """A new detector of `kind` (one of `KINDS`) with `params`."""
    if kind not in KINDS:
        raise LogitguardError(f"unknown detector kind {kind!r}; choose from {', '.join(KINDS)}")
    try:
        detector = REGISTRY[kind](**params)
    except TypeError as exc:
        raise LogitguardError(f"bad parameters for the {kind!r} detector: {exc}") from None
    detector._check_params()
    return detector


__all__ = [
    "KINDS", "LOGIT_KINDS", "Detector", "EnergyDetector", "InsenDetector", "KDensityDetector", "LearnedDetector",
    "MSPDetector", "MaxLogitDetector", "NonMEDetector", "NoisyLearnedDetector", "OddsCorrector", "OddsTest",
    "RankedNoisyLearnedDetector", "SingleShotOddsTest", "load_detector", "make_detector",
]
