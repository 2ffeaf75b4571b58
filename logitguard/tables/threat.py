"""The threat vocabulary of the table contract: what each attack partition's attacker knew, and budgets.

Every attack partition of a table records in the metadata key ``threat`` what its attacker had:
``oblivious`` (the model, not the defense), ``transfer`` (only a substitute model), ``query`` (only the
deployed pipeline's answers), ``surrogate`` (the defense's algorithm and settings, and its own copy trained
on other data) or ``adaptive`` (the defense's files). A partition without an entry is ``oblivious``
(docs/threat-models.md). Budgets are L-inf norms of pixels in [0, 1], written ``8/255``.

Read here, by the evaluation (`logitguard.evaluation.threat`), by the defenses' provenance and by the
producer that writes the entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from ..errors import LogitguardError, TableError
from .schema import CLEAN

__all__ = ["BUDGET_TOLERANCE", "DEFAULT_BUDGETS", "NO_DEFENSE", "THREAT_MODELS", "TIERS", "attack_eps",
           "format_budget", "judge_draws", "parse_budgets", "subset_partitions", "threat_of", "tier_attacks",
           "tier_parts"]

THREAT_MODELS = ("oblivious", "transfer", "query", "surrogate", "adaptive")
# Report order: from the attacker who knows least about the deployed system to the one who knows most.
TIERS = ("transfer", "query", "oblivious", "surrogate", "adaptive")
DEFAULT_BUDGETS = (8 / 255, 16 / 255)
BUDGET_TOLERANCE = 1e-6  # linf is stored as float32: 8/255 reads back as 0.03137255
NO_DEFENSE = "none"  # the pipeline name of the bare model


# ---------------------------------------------------------------------------------------------
# Vocabulary


def threat_of(metadata: Mapping[str, Any], attack: str) -> dict[str, Any]:
    """The threat entry of `attack` in table `metadata`, with ``model`` filled in (default ``oblivious``).

    Raises `TableError` when the entry is not an object or names an unknown threat model.
    """
    threat = metadata.get("threat") or {}
    if not isinstance(threat, Mapping):
        raise TableError(f"metadata 'threat' must be an object of attack name: entry, got {threat!r}")
    entry = threat.get(attack)
    if entry is None:
        entry = {}
    if not isinstance(entry, Mapping):
        raise TableError(f"metadata 'threat' for attack {attack!r} must be an object, got {entry!r}")
    out = {"model": "oblivious", **entry}
    if out["model"] not in THREAT_MODELS:
        raise TableError(f"metadata 'threat' for attack {attack!r}: unknown threat model {out['model']!r}; "
                         f"expected one of {', '.join(THREAT_MODELS)}")
    return out


def attack_eps(metadata: Mapping[str, Any], attack: str) -> float | None:
    """The L-inf budget `attack` ran with: its threat entry's ``eps``, else its parameters' (None: unbounded)."""
    eps = threat_of(metadata, attack).get("eps")
    if eps is None:
        eps = (metadata.get("attacks") or {}).get(attack, {}).get("eps")
    return float(eps) if isinstance(eps, (int, float)) else None


def judge_draws(metadata: Mapping[str, Any], attacks: Sequence[str]) -> dict[str, tuple[str, int]]:
    """The judge-draw partitions among `attacks`: {partition: (parent partition, draw number k >= 1)}, from
    the threat entries' ``judge_of`` / ``judge_draw`` (docs/threat-models.md, "Judge draws")."""
    out = {}
    for attack in attacks:
        if attack == CLEAN:
            continue
        entry = threat_of(metadata, attack)
        if entry.get("judge_of") is not None:
            out[attack] = (str(entry["judge_of"]), int(entry.get("judge_draw", 1)))
    return out


def subset_partitions(metadata: Mapping[str, Any], attacks: Sequence[str]) -> list[str]:
    """The partitions among `attacks` that hold a subset of the samples by design, and so do not set which
    samples a threat-model evaluation covers: judge draws (the samples no earlier draw broke), query
    attacks (thousands of queries per sample: the first samples only) and continuations (entries with
    ``after`` or ``focus``: the samples they attacked, which earlier partitions left unbroken)."""
    draws = judge_draws(metadata, attacks)
    out = []
    for attack in attacks:
        if attack == CLEAN:
            continue
        entry = threat_of(metadata, attack)
        if attack in draws or entry["model"] == "query" or entry.get("after") or entry.get("focus"):
            out.append(attack)
    return out


def tier_attacks(metadata: Mapping[str, Any], attacks: Sequence[str], pipeline: str) -> dict[str, list[str]]:
    """The attacks each tier takes its worst case over, for the pipeline named `pipeline`.

    transfer = transfer attacks; oblivious = oblivious attacks; surrogate = oblivious + surrogate attacks
    whose ``target`` is `pipeline`; adaptive = surrogate tier + adaptive attacks whose ``target`` is
    `pipeline`. For the bare model ("none") every oblivious attack is adaptive: it aims at that model.
    A tier is left out when none of its *own* attacks (those not inherited from the tier below) is in the
    table: an "adaptive" figure made of oblivious attacks alone would claim what was never measured.
    """
    return {tier: every for tier, (every, _) in tier_parts(metadata, attacks, pipeline).items()}


def tier_parts(metadata: Mapping[str, Any], attacks: Sequence[str], pipeline: str) -> dict[str, tuple[list, list]]:
    """Per tier with attacks of its own: (every attack of the tier, its own attacks). query = the query attacks
    aimed at `pipeline`; adaptive also takes them in (see `tier_attacks`)."""
    models = {a: threat_of(metadata, a) for a in attacks if a != CLEAN}

    def of(model: str, aimed: bool = False) -> list[str]:
        return [a for a, t in models.items() if t["model"] == model and (not aimed or t.get("target") == pipeline)]

    oblivious = of("oblivious")
    surrogate, adaptive = of("surrogate", aimed=True), of("adaptive", aimed=True)
    query = of("query", aimed=True)
    bare = oblivious if pipeline == NO_DEFENSE else []  # the bare model's attacker always knows all of it
    parts = {"transfer": (of("transfer"), of("transfer")),
             "query": (query, query),
             "oblivious": (oblivious, oblivious),
             "surrogate": (oblivious + surrogate, bare + surrogate),
             # the attacker with the files can also query the deployed pipeline
             "adaptive": (oblivious + surrogate + query + adaptive, bare + adaptive)}
    return {tier: part for tier, part in parts.items() if part[1]}


# ---------------------------------------------------------------------------------------------
# Budgets


def parse_budgets(text: str) -> tuple[float, ...]:
    """``"8/255,16/255"`` or ``"0.03,0.06"`` -> budgets as floats; `LogitguardError` on anything else."""
    budgets = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise LogitguardError(f"budgets must be numbers or fractions such as 8/255, got {part!r}") from None
        if not value > 0:
            raise LogitguardError(f"budgets must be positive, got {part!r}")
        budgets.append(value)
    return tuple(budgets)


def format_budget(eps: float) -> str:
    """``8/255`` for a whole number of 8-bit grey levels, else the number (``0.1``)."""
    levels = eps * 255
    return f"{round(levels)}/255" if abs(levels - round(levels)) < 1e-6 and round(levels) > 0 else f"{eps:g}"
