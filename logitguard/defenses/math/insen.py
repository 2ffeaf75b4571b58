"""The insen detector: a logistic regression on standardised input-sensitivity statistics."""

from __future__ import annotations

from typing import Any

from . import array_namespace, as_float64


def insen_score(stats: Any, center: Any, scale: Any, coef: Any, intercept: Any) -> Any:
    """The regression's logit for "attacked" (N,) from statistics (N, F), coef (F,), intercept (1,)."""
    xp = array_namespace(stats, coef)
    return (as_float64(stats, xp) - center) / scale @ coef + intercept[0]
