"""What an export is asked to run: attack names and aliases, their parameters and caps, and parameter sweeps.

Everything here is checked before any work (`plan_attacks`, `check_attack_params`, `expand_sweeps`), so a bad
name, alias or value fails at once instead of hours into a run. An attack may be run under an alias
(``pgd-eps8=pgd``), so one table can hold the same attack at two budgets; a sweep (`Sweep`, ``--sweep
pgd.eps=2/255,4/255``) runs it once per value of one parameter, each under its own alias.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from logitguard.tables import CLEAN

from ..attacks import attack_class
from ..errors import ProducerError

TRANSFER_PREFIX = "transfer-"
ALIAS_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
# The accepted range of every attack parameter the producer's own attacks take, checked before any work:
# (kind, lowest, lowest allowed?, highest). Budgets and step sizes are pixels in [0, 1].
PARAM_RANGES: dict[str, tuple[str, float | None, bool, float | None]] = {
    "eps": ("number", 0, False, 1), "alpha": ("number", 0, False, 1),
    "steps": ("integer", 1, True, None), "max_iter": ("integer", 1, True, None),
    "binary_search_steps": ("integer", 1, True, None), "candidates": ("integer", 2, True, None),
    "restarts": ("integer", 1, True, None), "eot": ("integer", 1, True, None),
    "check_draws": ("integer", 1, True, None), "search_steps": ("integer", 1, True, None),
    "lr": ("number", 0, False, None), "c_init": ("number", 0, False, None), "temperature": ("number", 0, False, None),
    "decay": ("number", 0, True, None), "overshoot": ("number", 0, True, None),
    "confidence": ("number", 0, True, None), "kappa": ("number", 0, True, None),
    "score_margin": ("number", 0, True, None),
    "random_start": ("boolean", None, True, None), "loss": ("ce|margin", None, True, None),
}


@dataclass(frozen=True)
class AttackSpec:
    """One requested attack: `name` (the alias; keys --param and --max-samples) runs attack `attack`."""

    name: str
    attack: str

    @classmethod
    def parse(cls, item: str) -> AttackSpec:
        """``"pgd"`` → (pgd, pgd); ``"pgd-eps8=pgd"`` → (pgd-eps8, pgd)."""
        alias, sep, attack = (s.strip() for s in item.partition("="))
        if not sep:
            return cls(alias, alias)
        if not ALIAS_PATTERN.fullmatch(alias):
            raise ProducerError(f"attack alias {alias!r} in {item!r} must be lowercase letters, digits, '-', '_' "
                                "or '.', starting with a letter or digit")
        if not attack:
            raise ProducerError(f"attack alias {item!r} names no attack; write ALIAS=ATTACK, e.g. pgd-eps8=pgd")
        if CLEAN in (alias, attack):
            raise ProducerError(f"{item!r}: '{CLEAN}' (the unattacked images) cannot be aliased or be an alias")
        if alias.startswith(TRANSFER_PREFIX):
            raise ProducerError(f"attack alias {alias!r}: the prefix {TRANSFER_PREFIX!r} is reserved for "
                                "transfer partitions (--substitute)")
        return cls(alias, attack)


def plan_attacks(
    attacks: Sequence[str],
    attack_params: Mapping[str, Mapping[str, Any]] | None = None,
    attack_samples: Mapping[str, int] | None = None,
) -> list[AttackSpec]:
    """Parse and check the requested attacks before any work: names, aliases, parameters and caps.

    `attacks` holds names (``clean``, ``pgd``, ``art:SquareAttack``) or ``ALIAS=ATTACK`` items;
    `attack_params` and `attack_samples` are keyed by the alias (the name when there is none).
    """
    specs = [AttackSpec.parse(a) for a in attacks]
    if not specs:
        raise ProducerError("no attacks requested")
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ProducerError(f"attack name(s) {repeated} requested more than once; give each run its own alias, "
                            "e.g. pgd-eps8=pgd")
    unknown = sorted(set(attack_params or {}) - set(names))
    if unknown:
        raise ProducerError(f"parameters given for attack(s) {unknown} that are not being run")
    # Caps for attacks not run are ignored: one --max-samples list can serve several exports.
    for name, cap in (attack_samples or {}).items():
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ProducerError(f"sample cap for attack {name!r} must be a positive integer, got {cap!r}")
    for spec in specs:
        params = dict((attack_params or {}).get(spec.name, {}))
        if spec.attack == CLEAN:
            if params:
                raise ProducerError(f"'{CLEAN}' takes no parameters, got {sorted(params)}")
            continue
        _check_attack_params(spec, params)
    return specs


@dataclass(frozen=True)
class Sweep:
    """One attack run once per value of one parameter (``--sweep pgd.eps=2/255,4/255,8/255``).

    `attack` is an attack name or an alias from ``--attacks``; `values` holds (text as given, value) pairs,
    the text naming the partition (`sweep_alias`) and the value going to the attack.
    """

    attack: str
    param: str
    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """``ATTACK.PARAM``: what the core calls the curve (``logitguard curve --sweep pgd.eps``)."""
        return f"{self.attack}.{self.param}"


def sweep_alias(attack: str, param: str, text: str) -> str:
    """The partition name of one sweep value: ``pgd-eps-2of255`` for ``pgd.eps=2/255``, ``pgd-steps-20``,
    ``art-squareattack-eps-0.05`` (lowercased; ``/`` reads ``of``; other characters a path or a hive key
    cannot hold become ``-``)."""
    def safe(part: str) -> str:
        return re.sub(r"[^a-z0-9._-]+", "-", part.strip().strip('"').lower().replace("/", "of")).strip("-")

    alias = f"{safe(attack)}-{safe(param)}-{safe(text)}"
    if not ALIAS_PATTERN.fullmatch(alias) or not safe(text):
        raise ProducerError(f"sweep value {text!r} of {attack}.{param} makes no usable partition name ({alias!r})")
    return alias


def expand_sweeps(
    attacks: Sequence[str],
    attack_params: Mapping[str, Mapping[str, Any]] | None,
    attack_samples: Mapping[str, int] | None,
    sweeps: Sequence[Sweep],
) -> tuple[list[str], dict[str, dict[str, Any]], dict[str, int], dict[str, dict[str, Any]]]:
    """`export`'s attacks, parameters, caps and ``sweeps`` with every sweep value added as an alias.

    A value's alias (`sweep_alias`) runs the swept attack with that attack's own ``--param`` values and the
    swept one replaced, under that attack's ``--max-samples`` cap. An attack that is only swept (not in
    `attacks`) lends its parameters to the sweep and is not run itself. Returns (attacks, attack_params,
    attack_samples, {alias: {"name", "attack", "param", "value"}}), the last for `export`'s ``sweeps``.
    """
    attacks = list(attacks)
    params = {k: dict(v) for k, v in (attack_params or {}).items()}
    caps = dict(attack_samples or {})
    specs = {s.name: s.attack for s in (AttackSpec.parse(a) for a in attacks)}
    entries: dict[str, dict[str, Any]] = {}
    lent: set[str] = set()
    for sweep in sweeps:
        if sweep.attack == CLEAN:
            raise ProducerError(f"--sweep {sweep.name}: '{CLEAN}' (the unattacked images) takes no parameters")
        if not sweep.values:
            raise ProducerError(f"--sweep {sweep.name} has no values; write e.g. {sweep.name}=2/255,4/255")
        values = [v for _, v in sweep.values]
        if len({json.dumps(v) for v in values}) < len(values):
            raise ProducerError(f"--sweep {sweep.name} repeats a value: {[t for t, _ in sweep.values]}")
        base = params.get(sweep.attack, {})
        if sweep.attack not in specs:
            lent.add(sweep.attack)
            if sweep.param in base:
                raise ProducerError(f"--param {sweep.name} is not used: --sweep {sweep.name} sets it (and "
                                    f"{sweep.attack} itself is not in --attacks)")
        for text, value in sweep.values:
            alias = sweep_alias(sweep.attack, sweep.param, text)
            attacks.append(f"{alias}={specs.get(sweep.attack, sweep.attack)}")
            params[alias] = {**{k: v for k, v in base.items() if k != sweep.param}, sweep.param: value}
            if sweep.attack in caps and alias not in caps:
                caps[alias] = caps[sweep.attack]
            entries[alias] = {"name": sweep.name, "attack": specs.get(sweep.attack, sweep.attack),
                              "param": sweep.param, "value": value}
    for name in lent:
        params.pop(name, None)
    return attacks, params, caps, entries


def _check_attack_params(spec: AttackSpec, params: dict[str, Any]) -> None:
    if spec.attack.startswith("art:"):
        return  # ARTAttack checks its names against the ART class when it is built
    where = spec.name if spec.name == spec.attack else f"{spec.name} ({spec.attack})"
    check_attack_params(spec.attack, params, where=f"attack {where}")


def check_attack_params(attack: str, params: Mapping[str, Any], *, where: str | None = None) -> None:
    """Refuse unknown parameter names (listing the accepted ones) and values out of range (`PARAM_RANGES`)
    for the registered attack `attack`, before any work."""
    cls = attack_class(attack)  # an unknown attack fails here, with the known names
    where = where or f"attack {attack}"
    unknown = sorted(set(params) - set(cls.param_names))
    if unknown:
        raise ProducerError(f"unknown parameter(s) {unknown} for {where}; accepted: {list(cls.param_names)}")
    defaults = _defaults(cls)
    for name, value in params.items():
        if value is None and defaults.get(name, 0) is None:
            continue  # "the attack's own rule" (e.g. alpha from eps and steps)
        problem = _out_of_range(name, value)
        if problem:
            raise ProducerError(f"{where}: {name} must be {problem}, got {value!r}")


def _defaults(cls: type) -> dict[str, Any]:
    """Keyword defaults along the class's __init__ chain (subclasses pass **kwargs to their base)."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None:
            out.update({n: p.default for n, p in inspect.signature(init).parameters.items()
                        if p.default is not inspect.Parameter.empty})
    return out


def _out_of_range(name: str, value: Any) -> str | None:
    """What `value` must be when it is outside `name`'s range; None when it is fine (or not ranged)."""
    if name not in PARAM_RANGES:
        return None
    kind, low, inclusive, high = PARAM_RANGES[name]
    if kind == "boolean":
        return None if isinstance(value, bool) else "true or false"
    if "|" in kind:
        choices = kind.split("|")
        return None if value in choices else " or ".join(repr(c) for c in choices)
    integer = kind == "integer"
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    ok = ok and math.isfinite(value) and (value >= low if inclusive else value > low)
    ok = ok and (high is None or value <= high)
    if ok:
        return None
    if integer:
        return "a positive integer" if low == 1 else f"an integer >= {low:g}"
    if high is not None:
        return f"a number in ({low:g}, {high:g}]"
    return "a number >= 0" if inclusive else "a positive number"

