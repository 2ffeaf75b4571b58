"""Attacks by name. Each attack lives in its own module behind `producers.attacks.base.Attack`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ProducerError
from .base import Attack

# Filled in as attack modules land: name -> class.
ATTACKS: dict[str, type[Attack]] = {}


def make_attack(name: str, model: nn.Module, **params: Any) -> Attack:
    """The attack called `name` (``fgsm``, ``pgd``, …, or ``art:ClassName`` for any ART evasion attack)."""
    if name.startswith("art:"):
        from .art import ARTAttack

        return ARTAttack(model, attack_name=name[4:], **params)
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise ProducerError(f"unknown attack {name!r}; known: {sorted(ATTACKS)} or art:<ClassName>") from None
    return cls(model, **params)


__all__ = ["ATTACKS", "Attack", "make_attack"]
