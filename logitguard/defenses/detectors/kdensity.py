"""K-density (Feinman et al. 2017, as used by Pang et al. 2018, seed 001 §3.2): an adversarial input's
penultimate-layer features lie far from the training features of the class the model predicts for it.

For a row with features f (F,) and predicted class ŷ = argmax of its logits, with X_ŷ the clean training
features of class ŷ (true labels):

    KD(f) = 1/|X_ŷ| Σ_{f_i ∈ X_ŷ} exp(−‖f − f_i‖² / σ²)        score = −log KD(f)

computed as log |X_ŷ| − logsumexp_i(−‖f − f_i‖² / σ²), so a kernel that underflows in float64 does not
turn the score infinite: far from every training point the score becomes the nearest squared distance
over σ². Higher = more adversarial. The bandwidth default is the paper's for CE-trained networks,
σ² = 1/0.26 (seed 001, caption of Table 2; 0.1/0.26 for its RCE-trained networks). It depends on the
scale of the features: for another network, pick it on clean validation rows.

Unsupervised: only clean rows are learnt from (attacked rows passed to `fit` are ignored); a quarter of
the samples is held out to calibrate the threshold on (see `calibration_fraction`). At most
``max_per_class`` training rows per class are kept (a seeded uniform sample), which bounds the file size
and the cost of a score (B × M distances, M kept rows). A predicted class with no clean training row
is scored against all kept rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ...errors import LogitguardError
from ..math.kdensity import kdensity_score
from .base import Detector

PAPER_SIGMA2 = 1 / 0.26  # seed 001, Table 2 caption: σ²_CE = 1/0.26


class KDensityDetector(Detector):
    """Kernel density of the penultimate features at the predicted class; see the module docstring.

    Parameters
    ----------
    fpr : target false-positive rate on clean rows.
    sigma2 : the Gaussian kernel's bandwidth σ² (in squared feature units).
    max_per_class : clean training rows kept per class (None: all).
    seed : seed of that subsample.
    """

    kind = "kdensity"
    input_column = "features"
    # The kept rows are the density's kernel centres: scored against themselves (a kernel of 1 at distance 0)
    # they look far more typical than new clean rows, and a threshold set on them flagged 17% of held-out
    # clean digits at a 5% target. So a share of the samples is held out for the calibration.
    calibration_fraction = 0.25

    def __init__(self, *, fpr: float = 0.05, sigma2: float = PAPER_SIGMA2, max_per_class: int | None = 1000,
                 seed: int = 0) -> None:
        super().__init__(fpr=fpr)
        self.sigma2 = sigma2
        self.max_per_class = max_per_class
        self.seed = seed

    def _check_params(self) -> None:
        super()._check_params()
        if not (isinstance(self.sigma2, (int, float)) and self.sigma2 > 0 and np.isfinite(self.sigma2)):
            raise LogitguardError(f"sigma2 must be a positive number, got {self.sigma2!r}")
        if self.max_per_class is not None and not (int(self.max_per_class) == self.max_per_class
                                                   and self.max_per_class >= 1):
            raise LogitguardError(f"max_per_class must be an integer >= 1 or None, got {self.max_per_class!r}")

    def _fit(self, logits: np.ndarray, attacked: np.ndarray, labels: np.ndarray | None, noisy: np.ndarray | None,
             *, features: np.ndarray) -> None:
        if labels is None or (np.asarray(labels)[~attacked] < 0).any():
            raise LogitguardError("the kdensity detector learns each class's clean features from the true labels: "
                                  "pass labels= (known for every clean row)")
        feats, y = features[~attacked], np.asarray(labels, dtype=np.int64)[~attacked]
        c = logits.shape[1]
        if (y >= c).any():
            raise LogitguardError(f"labels must be in [0, {c}) for logits of {c} classes")
        keep = _per_class_sample(y, self.max_per_class, self.seed)
        self.train_features_, self.train_labels_ = feats[keep], y[keep]
        self.class_counts_ = np.bincount(self.train_labels_, minlength=c)

    def _scores(self, logits: np.ndarray, noisy: np.ndarray | None, *, features: np.ndarray) -> np.ndarray:
        return kdensity_scores(features, logits.argmax(axis=1), self.train_features_, self.train_labels_,
                               self.class_counts_, self.sigma2)

    def _learned(self) -> dict[str, np.ndarray]:
        return {"train_features": self.train_features_, "train_labels": self.train_labels_,
                "class_counts": self.class_counts_}

    def _restore_learned(self, arrays: dict[str, np.ndarray]) -> None:
        self.train_features_ = arrays["train_features"]
        self.train_labels_ = arrays["train_labels"].astype(np.int64)
        self.class_counts_ = arrays["class_counts"].astype(np.int64)


def kdensity_scores(features: np.ndarray, predicted: np.ndarray, train: np.ndarray, train_labels: np.ndarray,
                    counts: np.ndarray, sigma2: float) -> np.ndarray:
    """−log KD (N,) of features (N, F) at classes `predicted` (N,) against training features (M, F) with labels
    (M,) and per-class counts (C,) (`logitguard.defenses.math.kdensity`), in row batches of about 2^22 distances."""
    out = np.empty(len(features))
    train_sq = np.einsum("mf,mf->m", train, train)
    for rows in _row_batches(len(features), len(train)):
        out[rows] = kdensity_score(features[rows], predicted[rows], train, train_sq, train_labels, counts, sigma2)
    return out


def _per_class_sample(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Sorted positions (≤ cap per class) of a seeded uniform sample within each class: a random order, then
    each row's rank among its class's rows in that order."""
    if cap is None:
        return np.arange(len(labels))
    order = np.random.default_rng(int(seed)).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts
    return np.sort(order[rank < int(cap)])


def _row_batches(rows: int, per_row: int, budget: int = 1 << 22) -> Iterator[slice]:
    step = max(1, budget // max(per_row, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))
