"""A gated pipeline's final label from the model's label, the detector's flag and the corrector's label."""

from __future__ import annotations

from typing import Any

from ..decision import ABSTAIN
from . import array_namespace

ON_FLAG = ("correct", "reject", "agree")


def gate(model_label: Any, flagged: Any, corrected: Any | None, on_flag: str) -> Any:
    """Final labels (B,), `ABSTAIN` where rejected: flagged rows take the corrector's label ("correct"),
    are rejected ("reject"), or keep the model's label when the corrector agrees with it and are rejected
    otherwise ("agree"); other rows keep the model's label."""
    xp = array_namespace(model_label, flagged)
    if on_flag == "reject":
        return xp.where(flagged, ABSTAIN, model_label)
    if on_flag == "correct":
        return xp.where(flagged, corrected, model_label)
    if on_flag == "agree":
        return xp.where(flagged & (corrected != model_label), ABSTAIN, model_label)
    raise ValueError(f"on_flag must be one of {', '.join(ON_FLAG)}; got {on_flag!r}")
