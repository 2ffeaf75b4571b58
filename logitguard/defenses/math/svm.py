"""The RBF SVM corrector: decision values, the exact vote and its differentiable surrogate.

``exact`` (one-vs-one, libsvm): a pair goes to its first class iff its decision value is > 0, each class
counts its pairs, and the most votes win (ties: the lowest class). `svm_votes` with a ``temperature`` T
is the surrogate: a pair gives sigmoid(decision / T) of a vote to its first class and the rest to its
second. ``nystroem`` (one-vs-rest): the decision values are the class scores; the label is their argmax.
"""

from __future__ import annotations

from typing import Any

from . import NEG, array_namespace, as_float64, device


def rbf_kernel(x: Any, centres: Any, centres_square: Any, gamma: float) -> Any:
    """exp(−γ ‖x − centre‖²) (N, M) for x (N, F), centres (M, F) and their squared norms (M,); the squared
    distance expanded as ‖x‖² + ‖c‖² − 2 x·c and clipped at 0."""
    xp = array_namespace(x, centres)
    dist = xp.sum(x * x, axis=1)[:, None] + centres_square[None, :] - 2.0 * (x @ centres.T)
    return xp.exp(-gamma * xp.maximum(dist, 0.0))


def svm_decision(logits: Any, center: Any, scale: Any, support_vectors: Any, sv_square: Any, coef: Any,
                 intercept: Any, gamma: float) -> Any:
    """Decision values float64 of logits (N, C) after standardising: exact (N, pairs), positive favours the
    pair's first class; nystroem (N, seen classes). Memory N × support vectors: batch the rows."""
    xp = array_namespace(logits, coef)
    x = (as_float64(logits, xp) - center) / scale
    return rbf_kernel(x, support_vectors, sv_square, gamma) @ coef + intercept


def sigmoid(x: Any) -> Any:
    """1 / (1 + exp(−x)), written so that neither branch overflows (finite values and gradients)."""
    xp = array_namespace(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def vote_matrices(pairs: Any, classes: Any, num_classes: int, xp: Any) -> tuple[Any, Any]:
    """(P, C) one-hot rows of each pair's first and second class (class ids, not positions), float64."""
    eye = xp.eye(num_classes, dtype=xp.float64, device=device(pairs))
    return xp.take(eye, xp.take(classes, pairs[0, :], axis=0), axis=0), xp.take(eye, xp.take(classes, pairs[1, :],
                                                                                                axis=0), axis=0)


def svm_votes(decision: Any, vote_first: Any, vote_second: Any, temperature: float | None = None) -> Any:
    """Votes per class (N, C) from one-vs-one decision values (N, P). ``temperature=None``: the exact
    vote (integers); T > 0: the soft vote, sigmoid(decision / T) for the first class (the surrogate that
    carries a gradient). Classes the SVM never saw get no votes."""
    xp = array_namespace(decision, vote_first)
    win = xp.astype(decision > 0, decision.dtype) if temperature is None else sigmoid(decision / temperature)
    return win @ vote_first + (1.0 - win) @ vote_second


def vote_labels(votes: Any) -> Any:
    """Labels (N,) int64 of exact votes (N, C): the most votes, ties to the lowest class (an explicit key,
    so the rule holds on every device)."""
    xp = array_namespace(votes)
    c = votes.shape[1]
    key = votes * c + xp.astype(xp.arange(c - 1, -1, -1, device=device(votes)), votes.dtype)
    return xp.argmax(key, axis=1)


def ovr_scores(decision: Any, classes: Any, num_classes: int) -> Any:
    """Class scores (N, C) from one-vs-rest decision values (N, seen classes): unseen classes at `NEG`."""
    xp = array_namespace(decision, classes)
    columns = xp.take(xp.eye(num_classes, dtype=decision.dtype, device=device(decision)), classes, axis=0)
    seen = xp.sum(columns, axis=0) > 0
    return xp.where(seen, decision @ columns, NEG)


def ovr_labels(decision: Any, classes: Any) -> Any:
    """Labels (N,): the class of the largest one-vs-rest decision value (the first on ties)."""
    xp = array_namespace(decision, classes)
    return xp.take(classes, xp.argmax(decision, axis=1), axis=0)
