"""The SVM corrector (seed 003): an RBF support-vector machine trained on adversarial logits.

Inputs are standardised, then an RBF `sklearn.svm.SVC` is fitted on attacked logits (FGSM by default,
any attack or mix allowed) with their true labels. Flagged rows are re-labelled by it (`GatedDefense`).

Persistence without pickle: the fitted one-vs-one machine is saved as plain arrays and predicted with
NumPy. The arrays are the support vectors, a (support vectors × class pairs) coefficient matrix,
intercepts and gamma. `predict` matches scikit-learn's, including its tie-breaking (lowest class wins).
Cost grows with the number of support vectors and with C² class pairs: it is meant for tens of classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._io import load_arrays
from .errors import LogitguardError
from .estimator import Estimator, check_logits
from .tables import CLEAN, LogitTable

LEGACY_FORMAT = "logitguard.SVMCorrector"  # SVM files before the shared estimator format (still read)
_BATCH = 2048


class SVMCorrector(Estimator):
    """Standardise, then RBF SVC (one-vs-one) from attacked logits to true labels.

    Parameters: ``C`` and ``gamma`` as in `sklearn.svm.SVC`; ``max_rows`` caps the training rows
    (a seeded random subset; SVC training time grows about quadratically); ``seed``.
    """

    estimator_name = "svm"
    fitted_attribute = "coef_"
    describes = "SVM corrector"

    def __init__(self, *, C: float = 1.0, gamma: str | float = "scale", max_rows: int = 20000, seed: int = 0) -> None:
        self.C = C
        self.gamma = gamma
        self.max_rows = max_rows
        self.seed = seed

    def _check_params(self) -> None:
        if not self.C > 0:
            raise LogitguardError(f"C must be > 0, got {self.C!r}")
        if not (self.gamma in ("scale", "auto") or (isinstance(self.gamma, (int, float)) and self.gamma > 0)):
            raise LogitguardError(f"gamma must be 'scale', 'auto' or a number > 0, got {self.gamma!r}")
        if not self.max_rows >= 1:
            raise LogitguardError(f"max_rows must be >= 1, got {self.max_rows!r}")

    def fit(self, logits: np.ndarray, labels: np.ndarray, *, noisy_logits: np.ndarray | None = None) -> SVMCorrector:
        """Train on attacked logits (N, C) and their true labels (N,); `noisy_logits` is ignored."""
        from sklearn.svm import SVC

        self._check_params()
        logits, _ = check_logits(logits)
        labels = np.asarray(labels)
        if labels.shape != logits.shape[:1] or (labels < 0).any():
            raise LogitguardError(f"need logits (N, C) and true labels (N,) >= 0; got {logits.shape}, {labels.shape}")
        if len(logits) > self.max_rows:
            keep = np.random.default_rng(self.seed).choice(len(logits), int(self.max_rows), replace=False)
            logits, labels = logits[keep], labels[keep]
        self.n_classes_ = logits.shape[1]
        self.center_, self.scale_ = logits.mean(axis=0), np.maximum(logits.std(axis=0), 1e-12)
        x = (logits - self.center_) / self.scale_
        # scikit-learn's definitions of "scale" and "auto", computed here rather than read from a private attribute
        gamma = {"scale": 1.0 / (x.shape[1] * max(x.var(), 1e-12)), "auto": 1.0 / x.shape[1]}.get(self.gamma, self.gamma)
        self._from_svc(SVC(C=self.C, gamma=float(gamma), kernel="rbf").fit(x, labels), float(gamma))
        return self

    def fit_table(self, table: LogitTable, attacks: str | list[str] = "fgsm", *, split: str | None = "train") -> SVMCorrector:
        """Train on the attacked rows of `attacks` in `split`."""
        attacks = [attacks] if isinstance(attacks, str) else list(attacks)
        if CLEAN in attacks or not attacks:
            raise LogitguardError(f"the SVM corrector trains on attacked rows; name attack(s), not {attacks}")
        rows = table.select(split=split, attacks=attacks)
        if not rows.has_labels:
            raise LogitguardError("training the SVM corrector needs ground-truth labels")
        missing = [a for a in attacks if a not in rows.attacks]
        if missing:
            raise LogitguardError(f"no rows for attack(s) {missing} in split {split!r}")
        self.attacks_ = attacks
        return self.fit(rows.logits, rows.labels)

    def _from_svc(self, svc, gamma: float) -> None:
        """Turn libsvm's one-vs-one layout into a dense (support vectors × pairs) coefficient matrix."""
        classes = svc.classes_
        n = len(classes)
        first, second = np.triu_indices(n, k=1)  # pairs in libsvm's order: (0,1), (0,2), …, (1,2), …
        sv_class = np.repeat(np.arange(n), svc.n_support_)
        dual = svc.dual_coef_  # (n - 1, n_sv)
        cols = np.arange(dual.shape[1])[:, None]
        coef_first = dual[np.clip(second - 1, 0, None)[None, :], cols]  # an SV of class i in pair (i, j)
        coef_second = dual[first[None, :], cols]  # an SV of class j in pair (i, j)
        self.coef_ = (np.where(sv_class[:, None] == first[None, :], coef_first, 0.0)
                      + np.where(sv_class[:, None] == second[None, :], coef_second, 0.0))
        self.support_vectors_ = svc.support_vectors_
        self.intercept_ = svc.intercept_
        self.pairs_ = np.stack([first, second])
        self.classes_ = classes
        self.gamma_ = gamma

    def decision_function(self, logits: np.ndarray) -> np.ndarray:
        """One-vs-one decision values (N, pairs); positive favours the pair's first class."""
        self._check_fitted()
        logits, _ = check_logits(logits, num_classes=self.n_classes_)
        x = (logits - self.center_) / self.scale_
        sv = self.support_vectors_
        out = np.empty((len(x), self.coef_.shape[1]))
        sv_sq = (sv * sv).sum(axis=1)
        for start in range(0, len(x), _BATCH):
            xb = x[start:start + _BATCH]
            dist = (xb * xb).sum(axis=1)[:, None] + sv_sq[None, :] - 2.0 * xb @ sv.T
            out[start:start + len(xb)] = np.exp(-self.gamma_ * np.maximum(dist, 0.0)) @ self.coef_ + self.intercept_
        return out

    def predict(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> np.ndarray:
        """Labels (N,) by one-vs-one voting; ties go to the lowest class, as in libsvm (`noisy_logits` ignored)."""
        decision = self.decision_function(logits)
        winners = np.where(decision > 0, self.pairs_[0], self.pairs_[1])
        n, k = len(winners), len(self.classes_)
        votes = np.bincount((winners + k * np.arange(n)[:, None]).ravel(), minlength=n * k).reshape(n, k)
        return self.classes_[votes.argmax(axis=1)]

    def predict_table(self, table: LogitTable) -> np.ndarray:
        return self.predict(table.logits)

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """Accuracy (scikit-learn's `score`)."""
        return float((self.predict(logits) == np.asarray(labels)).mean())

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"attacks": getattr(self, "attacks_", [])}, {name: getattr(self, f"{name}_") for name in _ARRAYS}

    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        missing = [name for name in _ARRAYS if name not in arrays]
        if missing:
            raise KeyError(f"SVM arrays lack {missing}")
        self.attacks_ = state.get("attacks", [])
        for name in _ARRAYS:
            setattr(self, f"{name}_", arrays[name])
        self.gamma_ = float(self.gamma_)
        self.n_classes_ = len(self.center_)

    @classmethod
    def load_legacy(cls, path: str | os.PathLike) -> SVMCorrector:
        """An SVM file from before the shared estimator format."""
        header, arrays = load_arrays(Path(path), LEGACY_FORMAT, "SVM corrector")
        svm = cls(**header["params"])
        try:
            svm._restore({"attacks": header.get("attacks", [])}, arrays)
        except KeyError as exc:
            raise LogitguardError(f"{path}: {exc}") from None
        return svm


_ARRAYS = ("center", "scale", "support_vectors", "coef", "intercept", "pairs", "classes", "gamma")
