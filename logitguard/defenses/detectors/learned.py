"""A learned logit detector: a small MLP that tells clean logits from attacked ones.

Input features, each standardised: the logits, their softmax and the logits sorted in descending order
(a class-agnostic view of how peaked the vector is). The ``learned-noisy`` variant adds, per class, the
mean and standard deviation over noise queries of the logit change f(x + η) − f(x). That is the odds
test's signal, left to the network to weigh. ``learned-ranked`` adds the same two moments of each query's
change sorted in descending order: class-agnostic inputs, for a detector meant to hold against attacks that
move other classes than the training attacks did (issue 22). The network is scikit-learn's `MLPClassifier`
(one hidden ReLU layer, Adam, early stopping). It is saved as plain arrays and scored with a NumPy forward
pass (`logitguard.defenses.math.learned`, shared with the producer's mirror), so loading never unpickles.
Positives are the attacked training rows of the chosen attacks whose attack succeeded (the clean prediction
was right and the attacked one is wrong): failed attacks look clean, and training on them would blur the
boundary.
"""

from __future__ import annotations

import numpy as np

from ...errors import LogitguardError
from ..math.learned import learned_features, mlp_score
from .base import Detector


class LearnedDetector(Detector):
    """MLP on logits, clean (0) vs successfully attacked (1); score = the MLP's logit for "attacked"."""

    kind = "learned"
    noise = False
    ranked = False  # the noise changes' ranked moments as well (`learned_features(ranked=True)`)
    calibration_fraction = 0.25
    successful_attacks_only = True

    def __init__(self, *, fpr: float = 0.05, hidden: int = 64, max_iter: int = 200, seed: int = 0) -> None:
        super().__init__(fpr=fpr)
        self.hidden = hidden
        self.max_iter = max_iter
        self.seed = seed

    def _fit(self, logits: np.ndarray, attacked: np.ndarray, labels: np.ndarray | None,
             noisy: np.ndarray | None) -> None:
        from sklearn.neural_network import MLPClassifier

        if not attacked.any():
            raise LogitguardError("the learned detector needs successfully attacked rows to learn from; got none")
        x = self._raw_features(logits, noisy)
        self.center_, self.scale_ = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        x -= self.center_  # in place: the feature matrix is the largest thing a fit holds
        x /= self.scale_
        mlp = MLPClassifier(hidden_layer_sizes=(int(self.hidden),), max_iter=int(self.max_iter), early_stopping=True,
                            random_state=int(self.seed)).fit(x, attacked.astype(int))
        (self.w1_, self.w2_), (self.b1_, self.b2_) = mlp.coefs_, mlp.intercepts_

    def _fit_row_bytes(self, num_classes: int) -> int:
        # float64 features: logits, softmax, sorted (+ 2 noise moments, + 2 ranked ones)
        return 8 * num_classes * (3 + 2 * self.noise + 2 * self.ranked)

    def _raw_features(self, logits: np.ndarray, noisy: np.ndarray | None) -> np.ndarray:
        """Unscaled features (N, F): logits, softmax, sorted logits (+ noise-change mean and std, + ranked)."""
        return learned_features(logits, noisy if self.noise else None, ranked=self.ranked)

    def _scores(self, logits: np.ndarray, noisy: np.ndarray | None) -> np.ndarray:
        x = self._raw_features(logits, noisy)
        if x.shape[1] != len(self.center_):
            raise LogitguardError(f"the logits give {x.shape[1]} features; this detector was fitted on "
                                  f"{len(self.center_)} (another number of classes?)")
        return mlp_score(x, self.center_, self.scale_, self.w1_, self.b1_, self.w2_, self.b2_)

    def _learned(self) -> dict[str, np.ndarray]:
        return {"center": self.center_, "scale": self.scale_, "w1": self.w1_, "b1": self.b1_, "w2": self.w2_,
                "b2": self.b2_}

    def _restore_learned(self, arrays: dict[str, np.ndarray]) -> None:
        for name in ("center", "scale", "w1", "b1", "w2", "b2"):
            setattr(self, f"{name}_", arrays[name])


class NoisyLearnedDetector(LearnedDetector):
    """The learned detector with the noise queries' logit changes as extra inputs."""

    kind = "learned-noisy"
    needs_noise = True
    noise = True


class RankedNoisyLearnedDetector(NoisyLearnedDetector):
    """The noisy learned detector with the ranked (sorted) noise changes' moments as extra inputs."""

    kind = "learned-ranked"
    ranked = True
