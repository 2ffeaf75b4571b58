"""Each defense's math, written once against the Python array API standard.

Every function here takes arrays of one namespace (NumPy in the core's apply, guard and serve; torch in
the producer's adaptive attacks, with autograd and on any device) and uses only that namespace's
functions, found with `array_api_compat.array_namespace`. The core's estimators (`logitguard.defenses`)
call them on NumPy arrays; `producers.threat.mirrors` loads the same saved arrays as torch tensors and
calls the same functions. Nothing here imports torch, scikit-learn or anything of the project above it.

Scores and decision values are computed in float64 (inputs are cast first); the logit corrector keeps
its weights' dtype (float32). Steps without a gradient keep their exact form and have a documented
differentiable surrogate beside them: the SVM's one-vs-one vote (`svm.svm_votes(temperature=…)`) and the
odds correction's -inf entries (`odds.odds_class_scores(soft=True)`); the predicted class that selects
class statistics (odds, K-density) carries no gradient in either form.

One module per defense: `baselines` (msp, maxlogit, energy, non-ME), `learned`, `odds`, `kdensity`,
`insen`, `corrector`, `svm`, and `gate` (a gated pipeline's final label).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device

NEG = -1e9  # finite stand-in for -inf in differentiable class scores

__all__ = ["NEG", "array_namespace", "as_float64", "class_mask", "relu", "relu_"]


def as_float64(x: Any, xp: Any) -> Any:
    """`x` as float64 (no copy when it already is)."""
    return x if x.dtype == xp.float64 else xp.astype(x, xp.float64)


def class_mask(y: Any, num_classes: int, xp: Any) -> Any:
    """(B, C) bool, True at column y[b] of row b: the one-hot mask of predicted classes y (B,)."""
    return y[:, None] == xp.arange(num_classes, device=device(y))[None, :]


def relu(x: Any, xp: Any) -> Any:
    """max(x, 0) elementwise (a new array)."""
    return xp.maximum(x, 0.0)


def relu_(x: Any) -> Any:
    """max(x, 0) in place, for a fresh intermediate whose value no gradient needs (x @ W + b): it spares
    NumPy a (rows × hidden) allocation per batch. Autograd gives relu's gradient."""
    x *= x > 0
    return x
