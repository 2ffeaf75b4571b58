"""Baseline scores of one logit vector (N, C) -> (N,) float64; higher = more adversarial."""

from __future__ import annotations

from typing import Any

from . import array_namespace, as_float64, class_mask


def softmax(logits: Any) -> Any:
    """Row-wise softmax (N, C) float64, shifted by each row's maximum so that it cannot overflow."""
    xp = array_namespace(logits)
    z = as_float64(logits, xp)
    e = xp.exp(z - xp.max(z, axis=1, keepdims=True))
    return e / xp.sum(e, axis=1, keepdims=True)


def msp_score(logits: Any) -> Any:
    """Negated maximum softmax probability (Hendrycks & Gimpel): low confidence looks adversarial."""
    xp = array_namespace(logits)
    return -xp.max(softmax(logits), axis=1)


def max_logit_score(logits: Any) -> Any:
    """Negated maximum logit."""
    xp = array_namespace(logits)
    return -xp.max(as_float64(logits, xp), axis=1)


def energy_score(logits: Any) -> Any:
    """Energy at temperature 1, -logsumexp(logits) (Liu et al. 2020): high energy looks adversarial."""
    xp = array_namespace(logits)
    z = as_float64(logits, xp)
    m = xp.max(z, axis=1)
    return -(m + xp.log(xp.sum(xp.exp(z - m[:, None]), axis=1)))


def nonme_score(logits: Any) -> Any:
    """Negated non-maximal entropy (Pang et al. 2018, seed 001): the entropy of the softmax entries other
    than the largest, renormalised to sum to 1; adversarial rows have *lower* non-ME, hence the sign.

    Computed as a log-softmax over the other classes, so no probability is logged after it underflows:
    the value and its gradient stay finite on very peaked logits."""
    xp = array_namespace(logits)
    z = as_float64(logits, xp)
    top = class_mask(xp.argmax(z, axis=1), z.shape[1], xp)
    others = xp.where(top, -xp.inf, z)
    m = xp.max(others, axis=1, keepdims=True)
    shifted = others - m
    log_q = xp.where(top, 0.0, shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True)))
    return xp.sum(xp.where(top, 0.0, xp.exp(log_q) * log_q), axis=1)  # = -entropy


SCORES = {"msp": msp_score, "maxlogit": max_logit_score, "energy": energy_score, "nonme": nonme_score}
