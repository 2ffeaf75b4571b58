"""The logit corrector's eval-mode network C → D → C (dropout off), in its weights' dtype (float32)."""

from __future__ import annotations

from typing import Any

from . import array_namespace, relu_


def corrector_logits(logits: Any, w1t: Any, b1: Any, w2t: Any, b2: Any) -> Any:
    """Corrected logits (B, C) = relu(x W1ᵀ + b1) W2ᵀ + b2 for x (B, C), given the transposed weights
    W1ᵀ (C, D) and W2ᵀ (D, C); x is cast to the weights' dtype. Memory B × D: batch the rows."""
    xp = array_namespace(logits, w1t)
    x = logits if logits.dtype == w1t.dtype else xp.astype(logits, w1t.dtype)
    hidden = x @ w1t
    hidden += b1  # in place: no gradient needs the product itself
    out = relu_(hidden) @ w2t
    out += b2
    return out
