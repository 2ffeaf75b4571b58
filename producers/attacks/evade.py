"""Detector evasion: misclassify while the detector's score stays below its calibrated threshold.

The attack of Carlini & Wagner's "Adversarial examples are not easily detected" (2017) in its
hinge form: each sample first crosses the model's decision boundary by ``kappa``, then lowers the
detector's score to ``score_margin`` spreads under the threshold, and keeps both (see `DefenseAttack`).
Against a pipeline that rejects flagged rows, this is the only way through.
"""

from __future__ import annotations

from typing import ClassVar

from .defended import DefenseAttack


class Evade(DefenseAttack):
    """Misclassify unflagged (the ``evade`` route); needs a pipeline with a detector."""

    name: ClassVar[str] = "evade"

    def routes(self):
        return ("evade",) if self.defense.detector is not None else ("model",)
