"""A learned logit detector: a small MLP that tells clean logits from attacked ones.

Input features, each standardised: the logits, their softmax and the logits sorted in descending order
(a class-agnostic view of how peaked the vector is). The ``learned-noisy`` variant adds, per class, the
mean and standard deviation over noise queries of the logit change f(x + η) − f(x). That is the odds
test's signal, left to the network to weigh. The network is scikit-learn's `MLPClassifier`
(one hidden ReLU layer, Adam, early stopping). It is saved as plain arrays and scored with a NumPy
forward pass, so loading never unpickles. Positives are the attacked training rows of the chosen
attacks whose attack succeeded (the clean prediction was right and the attacked one is wrong):
failed attacks look clean, and training on them would blur the boundary.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import LogitguardError
from ..tables import CLEAN, LogitTable, pair
from .base import Detector


class LearnedDetector(Detector):
    """MLP on logits, clean (0) vs successfully attacked (1); score = the MLP's logit for "attacked"."""

    kind = "learned"
    noise = False
    calibration_fraction = 0.25

    def __init__(self, *, fpr: float = 0.05, hidden: int = 64, max_iter: int = 200, seed: int = 0) -> None:
        super().__init__(fpr=fpr)
        self.hidden = int(hidden)
        self.max_iter = int(max_iter)
        self.seed = int(seed)

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "hidden": self.hidden, "max_iter": self.max_iter, "seed": self.seed}

    def _fit(self, table: LogitTable, attacks: list[str]) -> None:
        from sklearn.neural_network import MLPClassifier

        if not attacks:
            raise LogitguardError("the learned detector needs attacked rows to learn from; the table has none")
        clean = table.select(attacks=CLEAN)
        positives = []
        for attack in attacks:
            c, a = pair(table, attack)
            hit = (c.logits.argmax(1) == c.labels) & (a.logits.argmax(1) != a.labels)
            positives.append(self._raw_features(a.take(hit)))
        positives = np.concatenate(positives)
        if not len(positives):
            raise LogitguardError(f"no successful attack among {attacks} to learn from")
        x = np.concatenate([self._raw_features(clean), positives])
        self.center_, self.scale_ = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        x = (x - self.center_) / self.scale_
        y = np.r_[np.zeros(len(clean)), np.ones(len(x) - len(clean))]
        mlp = MLPClassifier(hidden_layer_sizes=(self.hidden,), max_iter=self.max_iter, early_stopping=True,
                            random_state=self.seed).fit(x, y)
        (self.w1_, self.w2_), (self.b1_, self.b2_) = mlp.coefs_, mlp.intercepts_

    def _raw_features(self, table: LogitTable) -> np.ndarray:
        """Unscaled features (N, F): logits, softmax, sorted logits (+ noise-change mean and std)."""
        z = table.logits.astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        parts = [z, p / p.sum(axis=1, keepdims=True), -np.sort(-z, axis=1)]
        if self.noise:
            if table.noisy_logits is None:
                raise LogitguardError("the 'learned-noisy' detector needs noise queries (column 'noisy_logits')")
            change = table.noisy_logits - z[:, None, :]
            parts += [change.mean(axis=1), change.std(axis=1)]
        return np.hstack(parts)

    def score(self, table: LogitTable) -> np.ndarray:
        if not hasattr(self, "w1_"):
            raise LogitguardError("this LearnedDetector is not fitted yet; call fit() or load() first")
        x = self._raw_features(table)
        if x.shape[1] != len(self.center_):
            raise LogitguardError(f"the table's logits give {x.shape[1]} features; this detector was fitted on "
                                  f"{len(self.center_)} (another number of classes?)")
        hidden = np.maximum((x - self.center_) / self.scale_ @ self.w1_ + self.b1_, 0.0)
        return (hidden @ self.w2_ + self.b2_)[:, 0]

    def _state(self) -> dict[str, np.ndarray]:
        return {"center": self.center_, "scale": self.scale_, "w1": self.w1_, "b1": self.b1_, "w2": self.w2_,
                "b2": self.b2_}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            setattr(self, f"{name}_", value)


class NoisyLearnedDetector(LearnedDetector):
    """The learned detector with the noise queries' logit changes as extra inputs."""

    kind = "learned-noisy"
    needs_noise = True
    noise = True
