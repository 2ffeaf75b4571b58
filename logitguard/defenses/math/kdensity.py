"""K-density (Feinman et al. 2017): −log of the mean Gaussian kernel to the predicted class's training rows."""

from __future__ import annotations

from typing import Any

from . import array_namespace, as_float64


def kdensity_score(features: Any, predicted: Any, train: Any, train_square: Any, train_labels: Any, counts: Any,
                   sigma2: float) -> Any:
    """−log KD (B,) of features (B, F) at classes `predicted` (B,) against training features (M, F) with
    their squared norms (M,), labels (M,) and per-class counts (C,), as log |X_ŷ| − logsumexp(−d² / σ²).

    A class never seen clean is scored against every training row. Differentiable in the features (the
    predicted class, which picks the rows, carries no gradient). Memory B × M: batch the rows."""
    xp = array_namespace(features, train)
    f = as_float64(features, xp)
    dist = xp.sum(f * f, axis=1)[:, None] + train_square[None, :] - 2.0 * (f @ train.T)
    present = xp.take(counts, predicted, axis=0) > 0
    mine = (train_labels[None, :] == predicted[:, None]) | ~present[:, None]
    logk = xp.where(mine, -xp.maximum(dist, 0.0) / sigma2, -xp.inf)
    top = xp.max(logk, axis=1)
    lse = top + xp.log(xp.sum(xp.exp(logk - top[:, None]), axis=1))
    count = xp.where(present, xp.take(counts, predicted, axis=0), train.shape[0])
    return xp.log(xp.astype(count, xp.float64)) - lse
