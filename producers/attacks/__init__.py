"""Attacks by name. Each attack lives in its own module behind `producers.attacks.base.Attack`.

Modules are imported on first use, so naming the registry costs nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from torch import nn

from ..errors import ProducerError
from .base import Attack

# name -> (module in this package, class name)
_REGISTRY: dict[str, tuple[str, str]] = {
    "fgsm": ("fgsm", "FGSM"),
    "bim": ("bim", "BIM"),
    "pgd": ("pgd", "PGD"),
    "mim": ("mim", "MIM"),
    "deepfool": ("deepfool", "DeepFool"),
    "cw": ("cw", "CarliniWagnerL2"),
}
ATTACK_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# Attacks through a defense (adaptive and surrogate threat models): they take ``defense=`` (a
# `producers.threat.mirrors.PipelineMirror`) and ``noise=`` (the table's `NoiseRecipe`).
_DEFENSE_REGISTRY: dict[str, tuple[str, str]] = {
    "defended-pgd": ("defended_pgd", "DefendedPGD"),
    "evade": ("evade", "Evade"),
    "routes": ("routes", "Routes"),
    "min-margin": ("min_margin", "MinMargin"),
    "apgd-ce": ("apgd", "APGDCE"),
    "apgd-dlr": ("apgd", "APGDDLR"),
    "apgd-t": ("apgd", "APGDT"),
    "orthogonal-pgd": ("orthogonal", "OrthogonalPGD"),
    "selective-pgd": ("orthogonal", "SelectivePGD"),
    "lagrangian": ("lagrangian", "Lagrangian"),
    "logit-match": ("logit_match", "LogitMatch"),
    "suite": ("sequence", "Suite"),
}
DEFENSE_ATTACK_NAMES: tuple[str, ...] = tuple(_DEFENSE_REGISTRY)
# Attacks that only query a pipeline as deployed (threat model ``query``): no gradients; they take ``defense=``,
# ``noise=`` and ``queries=`` (the budget per sample) and record the queries each success took.
_QUERY_REGISTRY: dict[str, tuple[str, str]] = {
    "square": ("square", "Square"),
    "rays": ("rays", "RayS"),
}
QUERY_ATTACK_NAMES: tuple[str, ...] = tuple(_QUERY_REGISTRY)


def attack_class(name: str) -> type[Attack]:
    """The class registered as `name`."""
    try:
        module, cls = {**_REGISTRY, **_DEFENSE_REGISTRY, **_QUERY_REGISTRY}[name]
    except KeyError:
        raise ProducerError(f"unknown attack {name!r}; known: {list(ATTACK_NAMES)} or art:<ClassName>") from None
    return getattr(import_module(f".{module}", __name__), cls)


def make_attack(name: str, model: nn.Module, **params: Any) -> Attack:
    """The attack called `name` (``fgsm``, ``pgd``, …, or ``art:ClassName`` for any ART evasion attack)."""
    if name.startswith("art:"):
        from .art import ARTAttack

        return ARTAttack(model, attack_name=name[4:], **params)
    return attack_class(name)(model, **params)


__all__ = ["ATTACK_NAMES", "DEFENSE_ATTACK_NAMES", "QUERY_ATTACK_NAMES", "Attack", "attack_class", "make_attack"]
