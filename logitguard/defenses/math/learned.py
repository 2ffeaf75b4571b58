"""The learned detector: features of the logits (and noise queries), then a one-hidden-layer MLP."""

from __future__ import annotations

from typing import Any

from . import array_namespace, as_float64, relu_
from .baselines import softmax


def learned_features(logits: Any, noisy: Any | None = None, *, ranked: bool = False) -> Any:
    """Unscaled features (N, F) float64: logits, softmax, logits sorted descending (F = 3C), and with noise
    queries (N, K, C) the mean and population std over queries of noisy − logits (F = 5C).

    `ranked` (needs `noisy`) adds the same two moments of each query's change sorted descending (F = 7C):
    how the largest, second largest, … change is spread, whatever classes they fall on. The per-class block
    ties what the network learns to the classes the training attacks moved; the ranked one does not."""
    xp = array_namespace(logits)
    z = as_float64(logits, xp)
    parts = [z, softmax(z), xp.sort(z, axis=1, descending=True)]
    if noisy is not None:
        change = as_float64(noisy, xp) - z[:, None, :]
        parts += _mean_std(change, xp)
        if ranked:
            parts += _mean_std(xp.sort(change, axis=2, descending=True), xp)
    elif ranked:
        raise ValueError("ranked features need noise queries")
    return xp.concat(parts, axis=1)


def _mean_std(values: Any, xp: Any) -> list[Any]:
    """[mean, population std] over axis 1 of `values` (N, K, C): two (N, C) arrays."""
    mean = xp.mean(values, axis=1)
    var = xp.mean((values - mean[:, None, :]) ** 2, axis=1)
    # sqrt'(0) is infinite: identical queries (or K = 1) would turn a gradient into NaN.
    return [mean, xp.where(var > 0, xp.sqrt(xp.maximum(var, 1e-300)), 0.0)]


def mlp_score(x: Any, center: Any, scale: Any, w1: Any, b1: Any, w2: Any, b2: Any) -> Any:
    """The MLP's logit for "attacked" (N,): relu(((x − center) / scale) W1 + b1) W2 + b2, for x (N, F),
    W1 (F, H), b1 (H,), W2 (H, 1), b2 (1,)."""
    hidden = (x - center) / scale @ w1
    hidden += b1
    return (relu_(hidden) @ w2 + b2)[:, 0]
