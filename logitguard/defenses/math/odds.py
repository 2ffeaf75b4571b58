"""The odds test (Roth et al. 2019): log-odds changes under noise, z-scored per predicted class.

With y the predicted class, g_k[z] = (f_z − f_y)(x + η_k) − (f_z − f_y)(x) (single-shot: (f_z − f_y)(x),
K = 1). The queries are averaged within groups (`OddsArrays.group_weights`, None: each query its own
group), each group is z-scored against clean rows predicted y, and the z-scores are averaged:
features (N, C), -inf at z = y. The score is their maximum over z ≠ y after subtracting the pair
thresholds; the correction's class scores are the features (``argmax``) or, for classes with a fitted
model, a multinomial logistic regression of the features (``logistic``) or of the raw kind averages
(``reference``). The predicted class y carries no gradient; `odds_class_scores(soft=True)` replaces the
exact -inf entries by `NEG` so that class scores stay finite for an attack's loss.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import NEG, array_namespace, as_float64, class_mask


class OddsArrays(NamedTuple):
    """A fitted odds test's arrays, in one namespace (C classes, G z-scored groups, K queries, E kinds).

    mean, inverse_scale : (C, G, C) class moments; inverse_scale = 1 / (G σ).
    pair_threshold : (C, C).
    group_weights : (G, K) averaging weights of the z-scored groups, or None (every query its own group).
    kind_weights : (E, K) averaging weights of the noise kinds (``reference`` only), else None.
    logistic_weights (C, C, F), logistic_bias (C, C) (-inf: a class the model never saw), logistic_fitted
    (C,) bool: the correction models (None for ``argmax``).
    """

    mean: Any
    inverse_scale: Any
    pair_threshold: Any
    group_weights: Any | None = None
    kind_weights: Any | None = None
    logistic_weights: Any | None = None
    logistic_bias: Any | None = None
    logistic_fitted: Any | None = None


def log_odds_changes(logits: Any, noisy: Any | None = None) -> tuple[Any, Any]:
    """Predicted classes y (N,) and g (N, K, C) float64 for logits (N, C) and noise queries (N, K, C)
    (None: the single-shot log-odds, K = 1); g[n, :, y_n] = 0."""
    xp = array_namespace(logits)
    z = as_float64(logits, xp)
    y = xp.argmax(z, axis=1)
    g = z[:, None, :] if noisy is None else as_float64(noisy, xp) - z[:, None, :]
    return y, g - xp.take_along_axis(g, y[:, None, None], axis=2)


def group_means(g: Any, weights: Any | None) -> Any:
    """(N, K, C) → (N, G, C): the weighted mean over the queries of each group (`weights` (G, K); None: g)."""
    if weights is None:
        return g
    xp = array_namespace(g, weights)
    return xp.matmul(weights, g)


def odds_features(y: Any, g: Any, arrays: OddsArrays) -> Any:
    """z-scored features (N, C) of the changes g (N, K, C) at predicted classes y (N,): the group means
    z-scored against class y's moments, averaged over groups; -inf at z = y."""
    xp = array_namespace(g, arrays.mean)
    a = group_means(g, arrays.group_weights)
    features = xp.sum((a - xp.take(arrays.mean, y, axis=0)) * xp.take(arrays.inverse_scale, y, axis=0), axis=1)
    return xp.where(class_mask(y, g.shape[2], xp), -xp.inf, features)


def odds_score(y: Any, features: Any, arrays: OddsArrays) -> Any:
    """The odds score (N,): max over z ≠ y of features − pair_threshold[y]."""
    xp = array_namespace(features)
    return xp.max(features - xp.take(arrays.pair_threshold, y, axis=0), axis=1)


def odds_class_scores(y: Any, g: Any, features: Any, arrays: OddsArrays, correction: str, *,
                      soft: bool = False) -> Any:
    """Class scores (N, C) of the correction rule; their argmax is the corrected label, never y.

    ``argmax``: the features. ``logistic`` / ``reference``: for rows whose class y has a fitted model,
    its logits (of the features with 0 at y, or of the flattened kind averages (N, E·C)); other rows
    the features. Exact: -inf at y and at classes a model never saw. ``soft=True``: `NEG` there instead
    (finite class scores for gradients, the same argmax)."""
    xp = array_namespace(features)
    own = class_mask(y, features.shape[1], xp)
    fallback = xp.where(own, NEG, features) if soft else features
    if correction == "argmax":
        return fallback
    if correction == "reference":
        kinds = group_means(g, arrays.kind_weights)
        x = xp.reshape(kinds, (kinds.shape[0], kinds.shape[1] * kinds.shape[2]))
    else:
        x = xp.where(own, 0.0, features)
    bias = xp.take(arrays.logistic_bias, y, axis=0)
    if soft:
        bias = xp.where(xp.isinf(bias), NEG, bias)
    scores = xp.matmul(xp.take(arrays.logistic_weights, y, axis=0), x[:, :, None])[:, :, 0] + bias
    return xp.where(xp.take(arrays.logistic_fitted, y, axis=0)[:, None], scores, fallback)
