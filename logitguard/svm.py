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

from ._io import load_arrays, save_arrays
from .errors import LogitguardError
from .tables import CLEAN, LogitTable

FORMAT = "logitguard.SVMCorrector"
_BATCH = 2048


class SVMCorrector:
    """Standardise, then RBF SVC (one-vs-one) from attacked logits to true labels.

    Parameters: ``C`` and ``gamma`` as in `sklearn.svm.SVC`; ``max_rows`` caps the training rows
    (a seeded random subset; SVC training time grows about quadratically); ``seed``.
    """

    def __init__(self, *, C: float = 1.0, gamma: str | float = "scale", max_rows: int = 20000, seed: int = 0) -> None:
        if C <= 0:
            raise LogitguardError(f"C must be > 0, got {C!r}")
        self.C, self.gamma, self.max_rows, self.seed = float(C), gamma, int(max_rows), int(seed)

    def get_params(self) -> dict[str, Any]:
        return {"C": self.C, "gamma": self.gamma, "max_rows": self.max_rows, "seed": self.seed}

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> SVMCorrector:
        """Train on attacked logits (N, C) and their true labels (N,)."""
        from sklearn.svm import SVC

        logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
        if logits.ndim != 2 or labels.shape != logits.shape[:1] or (labels < 0).any():
            raise LogitguardError(f"need logits (N, C) and true labels (N,) >= 0; got {logits.shape}, {labels.shape}")
        if len(logits) > self.max_rows:
            keep = np.random.default_rng(self.seed).choice(len(logits), self.max_rows, replace=False)
            logits, labels = logits[keep], labels[keep]
        self.n_classes_ = logits.shape[1]
        self.center_, self.scale_ = logits.mean(axis=0), np.maximum(logits.std(axis=0), 1e-12)
        svc = SVC(C=self.C, gamma=self.gamma, kernel="rbf").fit((logits - self.center_) / self.scale_, labels)
        self._from_svc(svc)
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

    def _from_svc(self, svc) -> None:
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
        self.gamma_ = float(svc._gamma)

    def decision_function(self, logits: np.ndarray) -> np.ndarray:
        """One-vs-one decision values (N, pairs); positive favours the pair's first class."""
        self._check_fitted(logits)
        x = (np.asarray(logits, dtype=np.float64) - self.center_) / self.scale_
        sv = self.support_vectors_
        out = np.empty((len(x), self.coef_.shape[1]))
        sv_sq = (sv * sv).sum(axis=1)
        for start in range(0, len(x), _BATCH):
            xb = x[start:start + _BATCH]
            dist = (xb * xb).sum(axis=1)[:, None] + sv_sq[None, :] - 2.0 * xb @ sv.T
            out[start:start + len(xb)] = np.exp(-self.gamma_ * np.maximum(dist, 0.0)) @ self.coef_ + self.intercept_
        return out

    def predict(self, logits: np.ndarray) -> np.ndarray:
        """Labels (N,) by one-vs-one voting; ties go to the lowest class, as in libsvm."""
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

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        self._check_fitted()
        header = {"format": FORMAT, "params": self.get_params(), "attacks": getattr(self, "attacks_", [])}
        arrays = {name: getattr(self, f"{name}_") for name in _ARRAYS}
        return save_arrays(Path(path), header, arrays, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SVMCorrector:
        path = Path(path)
        header, arrays = load_arrays(path, FORMAT, "SVM corrector")
        missing = [name for name in _ARRAYS if name not in arrays]
        if missing:
            raise LogitguardError(f"{path}: SVM corrector file lacks {missing}")
        svm = cls(**header["params"])
        svm.attacks_ = header["attacks"]
        for name, value in arrays.items():
            setattr(svm, f"{name}_", value)
        svm.gamma_ = float(svm.gamma_)
        svm.n_classes_ = len(svm.center_)
        return svm

    def _check_fitted(self, logits: np.ndarray | None = None) -> None:
        if not hasattr(self, "coef_"):
            raise LogitguardError("this SVMCorrector is not fitted yet; call fit() or load() first")
        if logits is not None and np.shape(logits)[-1] != self.n_classes_:
            raise LogitguardError(f"logits have {np.shape(logits)[-1]} classes; this SVM was trained on {self.n_classes_}")


_ARRAYS = ("center", "scale", "support_vectors", "coef", "intercept", "pairs", "classes", "gamma")
