"""The InSen detector: input-sensitivity statistics, clean vs attacked, with a logistic regression.

GRED (seed 002) detects adversarial images from the input-sensitivity map g = |∂ CE(f(x), ŷ) / ∂x|:
adversarial inputs sit near a decision boundary, where the loss of the predicted class is steep and its
gradient concentrated, and a CNN trained on the maps tells them from clean ones. The core never sees
images, so the producer exports a fixed summary of g per row (column ``insen``, `producers/models/insen.py`):
log mean g, log ‖g‖₂, log max g and the shares of Σg held by the top 1% and top 10% of the entries.
This detector standardises those 5 numbers and fits a logistic regression (scikit-learn, L2, ``C``)
on clean rows (0) against successfully attacked rows (1), holding out ``calibration_fraction`` of the
samples to calibrate the threshold, as ``learned`` does. Score = the regression's logit.

What it loses against GRED: the spatial layout of g (where the sensitivity sits, its texture), which
GRED's CNN reads; 5 global numbers keep only its size and concentration. The image-space detector lives
in the producer (its results arrive as ``external_score`` / ``external_label``); this one is the part
the core can run from a table, and the one a mirror can attack (`producers.threat.mirrors.InsenMirror`).
"""

from __future__ import annotations

import numpy as np

from ...errors import LogitguardError
from ..math.insen import insen_score
from .base import Detector


class InsenDetector(Detector):
    """Logistic regression on the standardised InSen statistics; score = its logit for "attacked"."""

    kind = "insen"
    input_column = "insen"
    calibration_fraction = 0.25
    successful_attacks_only = True

    def __init__(self, *, fpr: float = 0.05, C: float = 1.0) -> None:  # noqa: N803 (scikit-learn's name)
        super().__init__(fpr=fpr)
        self.C = C

    def _check_params(self) -> None:
        super()._check_params()
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise LogitguardError(f"C must be a positive number, got {self.C!r}")

    def _fit(self, logits: np.ndarray, attacked: np.ndarray, labels: np.ndarray | None, noisy: np.ndarray | None,
             *, features: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        if not attacked.any() or attacked.all():
            raise LogitguardError("the insen detector learns clean vs successfully attacked rows; it needs both")
        self.center_, self.scale_ = features.mean(axis=0), np.maximum(features.std(axis=0), 1e-6)
        model = LogisticRegression(C=float(self.C), max_iter=1000).fit((features - self.center_) / self.scale_,
                                                                      attacked.astype(int))
        self.coef_, self.intercept_ = model.coef_[0].astype(np.float64), model.intercept_.astype(np.float64)

    def _scores(self, logits: np.ndarray, noisy: np.ndarray | None, *, features: np.ndarray) -> np.ndarray:
        return insen_score(features, self.center_, self.scale_, self.coef_, self.intercept_)

    def _learned(self) -> dict[str, np.ndarray]:
        return {"center": self.center_, "scale": self.scale_, "coef": self.coef_, "intercept": self.intercept_}

    def _restore_learned(self, arrays: dict[str, np.ndarray]) -> None:
        for name in ("center", "scale", "coef", "intercept"):
            setattr(self, f"{name}_", arrays[name])
