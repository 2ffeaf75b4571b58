"""The SVM corrector (seed 003): an RBF support-vector machine trained on adversarial logits.

Inputs are standardised, then an RBF kernel machine is fitted on attacked logits (FGSM by default, any
attack or mix allowed) with their true labels. Flagged rows are re-labelled by it (`GatedDefense`).
Two methods (``method``; ``"auto"`` picks exact up to `EXACT_MAX_CLASSES` classes, else nystroem):

- ``"exact"``: scikit-learn's `SVC` (libsvm, one-vs-one). Saved as the support vectors, a (support
  vectors × class pairs) coefficient matrix, intercepts and gamma; `predict` votes (`logitguard.defenses.math.svm`,
  with its differentiable surrogate beside it) and matches
  scikit-learn's, including its tie-breaking (lowest class wins). Training grows about quadratically with
  the rows, prediction and the file with C² class pairs: at 1000 classes (499,500 pairs) fitting 20k rows
  took 225 s, scikit-learn predicted 13 rows/s and the coefficient matrix would need 80 GB.
- ``"nystroem"``: a least-squares SVM (Suykens & Vandewalle 1999), one-vs-rest, on a Nyström
  approximation of the same RBF kernel: ``landmarks`` training rows (class-balanced, seeded) span the
  model, ``f(x) = K(x, landmarks) @ coef + intercept`` with one column per class, and
  ``predict = argmax``. The fit is one linear solve, ``(K̃ᵀK̃ + K_LL / C) coef = K̃ᵀY`` (K̃: the centred
  kernel between rows and landmarks, Y: ±1 targets, intercepts unpenalised), accumulated over row
  batches: time linear in rows and classes, memory (landmarks² + landmarks × classes). Same arrays as
  exact, with the landmarks as support vectors and a (landmarks × classes) coefficient matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import LogitguardError
from .estimator import Estimator, check_logits, choose_attacks
from .math.svm import ovr_labels, rbf_kernel, svm_decision, svm_votes, vote_labels, vote_matrices
from ..tables import LogitTable, require_one_split

METHODS = ("auto", "exact", "nystroem")
EXACT_MAX_CLASSES = 50  # method="auto" fits the exact one-vs-one SVC up to this many classes
DEFAULT_MAX_ROWS = {"exact": 20_000, "nystroem": 200_000}  # max_rows=None: quadratic vs linear training time
EXACT_MAX_BYTES = 4 << 30  # refuse an exact fit whose (support vectors × pairs) matrix could pass 4 GiB
_BATCH = 2048


class SVMCorrector(Estimator):
    """Standardise, then an RBF kernel machine from attacked logits to true labels.

    Parameters: ``C`` and ``gamma`` as in `sklearn.svm.SVC` (for nystroem, C weighs the squared errors
    against the norm, ridge 1/C); ``method``: "auto" (exact up to `EXACT_MAX_CLASSES` classes, else
    nystroem), "exact" or "nystroem" (see the module); ``landmarks``: Nyström landmarks (rows spanning
    the approximate model); ``max_rows`` caps the training rows (a seeded random subset; None: 20,000
    for exact, whose training time grows about quadratically, 200,000 for nystroem, linear); ``seed``.
    """

    kind = "svm"
    fitted_attribute = "coef_"
    describes = "SVM corrector"

    def __init__(self, *, C: float = 1.0, gamma: str | float = "scale", method: str = "auto", landmarks: int = 1000,
                 max_rows: int | None = None, seed: int = 0) -> None:
        self.C = C
        self.gamma = gamma
        self.method = method
        self.landmarks = landmarks
        self.max_rows = max_rows
        self.seed = seed

    def _check_params(self) -> None:
        if not self.C > 0:
            raise LogitguardError(f"C must be > 0, got {self.C!r}")
        if not (self.gamma in ("scale", "auto") or (isinstance(self.gamma, (int, float)) and self.gamma > 0)):
            raise LogitguardError(f"gamma must be 'scale', 'auto' or a number > 0, got {self.gamma!r}")
        if self.method not in METHODS:
            raise LogitguardError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if not (isinstance(self.landmarks, (int, np.integer)) and self.landmarks >= 1):
            raise LogitguardError(f"landmarks must be an integer >= 1, got {self.landmarks!r}")
        if not (self.max_rows is None or (isinstance(self.max_rows, (int, np.integer)) and self.max_rows >= 1)):
            raise LogitguardError(f"max_rows must be None or an integer >= 1, got {self.max_rows!r}")

    def fit(self, logits: np.ndarray, labels: np.ndarray, *, noisy_logits: np.ndarray | None = None) -> SVMCorrector:
        """Train on attacked logits (N, C) and their true labels (N,); `noisy_logits` is ignored."""
        self._check_params()
        logits, _ = check_logits(logits)
        labels = np.asarray(labels)
        if labels.shape != logits.shape[:1] or (labels < 0).any():
            raise LogitguardError(f"need logits (N, C) and true labels (N,) >= 0; got {logits.shape}, {labels.shape}")
        method = self.method
        if method == "auto":
            method = "exact" if logits.shape[1] <= EXACT_MAX_CLASSES else "nystroem"
        max_rows = DEFAULT_MAX_ROWS[method] if self.max_rows is None else int(self.max_rows)
        rows = min(len(logits), max_rows)
        classes = len(np.unique(labels))
        if method == "exact" and rows * classes * (classes - 1) // 2 * 8 > EXACT_MAX_BYTES:
            raise LogitguardError(
                f"method='exact' at {classes} classes and {rows} rows could need "
                f"{rows * classes * (classes - 1) * 4 / 2**30:.0f} GiB for its (support vectors × class pairs) "
                f"matrix, and one-vs-one training and prediction grow with the {classes * (classes - 1) // 2} pairs; "
                "use method='nystroem' (or 'auto'), or fewer rows (max_rows)")
        if len(logits) > max_rows:
            keep = np.random.default_rng(self.seed).choice(len(logits), max_rows, replace=False)
            logits, labels = logits[keep], labels[keep]
        self.n_classes_ = logits.shape[1]
        self.center_, self.scale_ = logits.mean(axis=0), np.maximum(logits.std(axis=0), 1e-12)
        x = (logits - self.center_) / self.scale_
        # scikit-learn's definitions of "scale" and "auto", computed here rather than read from a private attribute
        gamma = {"scale": 1.0 / (x.shape[1] * max(x.var(), 1e-12)), "auto": 1.0 / x.shape[1]}.get(self.gamma, self.gamma)
        self.method_ = method
        if method == "exact":
            from sklearn.svm import SVC

            self._from_svc(SVC(C=self.C, gamma=float(gamma), kernel="rbf").fit(x, labels), float(gamma))
        else:
            self._fit_nystroem(x, labels, float(gamma))
        return self

    def fit_table(self, table: LogitTable, attacks: str | Sequence[str] | None = None) -> SVMCorrector:
        """Train on the attacked rows of `attacks` (default: every attack) of `table`, of one split (select
        them first: ``table.select(split="train")``)."""
        require_one_split(table, "training the SVM corrector", hint="train")
        attacks = choose_attacks(attacks, table.attacks)
        rows = table.select(attacks=attacks)
        if not rows.has_labels:
            raise LogitguardError("training the SVM corrector needs ground-truth labels")
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

    def _fit_nystroem(self, x: np.ndarray, labels: np.ndarray, gamma: float) -> None:
        """Least-squares SVM, one-vs-rest, on the Nyström features of `landmarks` rows (see the module).

        Minimises Σ‖K̃ coef + intercept − Y‖² + (1/C) tr(coefᵀ K_LL coef): ridge regression on the Nyström
        features K(x, L) K_LL^(-1/2), written in the landmarks' coefficients so that no matrix root is taken.
        """
        from scipy import linalg, sparse

        classes, y = np.unique(labels, return_inverse=True)
        landmarks = x[_balanced_rows(y, int(self.landmarks), self.seed)]
        landmarks = landmarks[np.sort(np.unique(landmarks, axis=0, return_index=True)[1])]  # repeated rows once
        m, k, n = len(landmarks), len(classes), len(x)
        gram, class_sums, total = np.zeros((m, m)), np.zeros((k, m)), np.zeros(m)
        lm_sq = (landmarks * landmarks).sum(axis=1)
        for start in range(0, n, _BATCH):
            kb = _rbf(x[start:start + _BATCH], landmarks, lm_sq, gamma)
            gram += kb.T @ kb
            total += kb.sum(axis=0)
            yb = y[start:start + _BATCH]
            class_sums += sparse.csr_matrix((np.ones(len(yb)), (yb, np.arange(len(yb)))), shape=(k, len(yb))) @ kb
        mean_k = total / n
        counts = np.bincount(y, minlength=k)
        mean_y = 2.0 * counts / n - 1.0  # targets are +1 for the row's class, -1 for the others
        # Centred normal equations: the intercepts are unpenalised.
        system = gram - n * np.outer(mean_k, mean_k) + _rbf(landmarks, landmarks, lm_sq, gamma) / self.C
        rhs = 2.0 * class_sums.T - total[:, None] - n * np.outer(mean_k, mean_y)
        system[np.diag_indices(m)] += 1e-10 * max(float(np.trace(system)) / m, 1e-300)  # rounding only
        try:
            coef = linalg.solve(system, rhs, assume_a="pos")
        except (linalg.LinAlgError, ValueError):
            coef = linalg.lstsq(system, rhs)[0]
        self.coef_ = coef
        self.support_vectors_ = landmarks
        self.intercept_ = mean_y - mean_k @ coef
        self.classes_ = classes
        self.gamma_ = gamma

    def decision_function(self, logits: np.ndarray) -> np.ndarray:
        """Decision values: exact, one-vs-one (N, pairs), positive favours the pair's first class;
        nystroem, one-vs-rest (N, classes), one column per class in `classes_`."""
        return np.concatenate(list(self._decisions(logits)))

    def predict(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> np.ndarray:
        """Labels (N,) (`noisy_logits` ignored). Exact: one-vs-one voting, ties to the lowest class as in
        libsvm; nystroem: the class of the largest decision value (ties: the lowest class). Batch by batch:
        memory grows with the batch, not with N × classes."""
        return np.concatenate([self._labels(decision) for decision in self._decisions(logits)])

    def _decisions(self, logits: np.ndarray) -> Iterator[np.ndarray]:
        """`decision_function` in batches of `_BATCH` rows."""
        self._check_fitted()
        logits, _ = check_logits(logits, num_classes=self.n_classes_)
        sv = self.support_vectors_
        sv_sq = (sv * sv).sum(axis=1)
        for start in range(0, len(logits), _BATCH):
            yield svm_decision(logits[start:start + _BATCH], self.center_, self.scale_, sv, sv_sq, self.coef_,
                               self.intercept_, self.gamma_)

    def _labels(self, decision: np.ndarray) -> np.ndarray:
        """Labels of decision values (`logitguard.defenses.math.svm`: the exact vote or the one-vs-rest argmax)."""
        if self.method_ == "nystroem":
            return ovr_labels(decision, self.classes_)
        return vote_labels(svm_votes(decision, *vote_matrices(self.pairs_, self.classes_, self.n_classes_, np)))

    def predict_table(self, table: LogitTable) -> np.ndarray:
        return self.predict(table.logits)

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """Accuracy (scikit-learn's `score`)."""
        return float((self.predict(logits) == np.asarray(labels)).mean())

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        state = {"attacks": getattr(self, "attacks_", []), "method": self.method_}
        return state, {name: getattr(self, f"{name}_") for name in _ARRAYS[self.method_]}

    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        method = state.get("method", "exact")  # files from before `method` hold the exact SVC
        if method not in _ARRAYS:
            raise ValueError(f"unknown SVM method {method!r}")
        missing = [name for name in _ARRAYS[method] if name not in arrays]
        if missing:
            raise KeyError(f"SVM arrays lack {missing}")
        self.attacks_ = state.get("attacks", [])
        self.method_ = method
        for name in _ARRAYS[method]:
            setattr(self, f"{name}_", arrays[name])
        self.gamma_ = float(self.gamma_)
        self.n_classes_ = len(self.center_)


_ARRAYS = {  # the saved arrays of each method (nystroem's support vectors are its landmarks)
    "exact": ("center", "scale", "support_vectors", "coef", "intercept", "pairs", "classes", "gamma"),
    "nystroem": ("center", "scale", "support_vectors", "coef", "intercept", "classes", "gamma"),
}


_rbf = rbf_kernel  # exp(-gamma ‖x - centre‖²) (N, M), shared with the decision values


def _balanced_rows(y: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of up to `count` distinct rows, seeded, taking the classes in turn (each class's rows in a
    random order), so that rare classes get landmarks too; sorted."""
    order = np.random.default_rng(seed).permutation(len(y))
    by_class = order[np.argsort(y[order], kind="stable")]  # grouped by class, random within a class
    turn = np.arange(len(y)) - np.searchsorted(y[by_class], y[by_class])  # 0 for a class's first row, 1, …
    rank = np.empty(len(y), dtype=np.int64)
    rank[order] = np.arange(len(y))
    picked = by_class[np.lexsort((rank[by_class], turn))[:count]]  # turn by turn, classes in random order
    return np.sort(picked)
