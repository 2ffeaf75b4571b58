"""The sequenced suite (``suite``): attacks in order, each only on the samples still robust.

AutoAttack's economy: most samples fall to the first, cheap attack, so the strong ones run on few. Each
attack of ``sequence`` runs on the samples that no earlier attack broke. A success counts when it holds on
max(the attack's own ``check_draws``, ``confirm_draws``) fresh noise draws: against a noise-reading pipeline
an iterate that got through on one draw is often stopped on the judge's, and the samples it stood for would
never meet the stronger attacks. A sample keeps the first confirmed image; else the first success that held
on one draw only; else the clean image. The
suite records per sample which attack broke it and, per attack, the attack-failure indicators of Pintor et
al. (NeurIPS 2022) that it can see (`record`): samples it ran on, successes it claimed, unbroken samples
whose loss stopped improving in the first half of a run, and how much of the budget its successes used
(``judge_rejected``, claimed successes the core pipeline does not confirm, is added by the export).

``sequence``: attack names, or ``[name, {params}]`` / ``{"attack": name, **params}`` entries. Parameters
given to the suite itself (``steps``, ``restarts``, ``eot``, ``check_draws``, …) go to every attack, an
entry's own ones override them. Default: `default_sequence`, cheap to strong; attacks that only make sense
against a detector (or noise queries) are dropped where the pipeline has none.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .defended import DefenseAttack

DEFAULT_SEQUENCE = ("apgd-ce", "apgd-dlr", "lagrangian", "orthogonal-pgd", "selective-pgd", "apgd-t", "logit-match",
                    "routes")
_NEEDS_DETECTOR = {"lagrangian", "orthogonal-pgd", "selective-pgd", "evade"}
_NEEDS_NOISE = {"logit-match"}
_RUNTIME = ("batch_size", "device", "precision", "channels_last")


def default_sequence(defense: nn.Module) -> list[str]:
    """`DEFAULT_SEQUENCE` without the attacks that reduce to an earlier one on `defense`."""
    return [a for a in DEFAULT_SEQUENCE if (a not in _NEEDS_DETECTOR or defense.detector is not None)
            and (a not in _NEEDS_NOISE or defense.needs_noise)]


def _entries(sequence: Any) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for item in sequence:
        if isinstance(item, str):
            out.append((item, {}))
        elif isinstance(item, dict) and isinstance(item.get("attack"), str):
            out.append((item["attack"], {k: v for k, v in item.items() if k != "attack"}))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) \
                and isinstance(item[1], dict):
            out.append((item[0], dict(item[1])))
        else:
            raise ValueError(f"a sequence entry is a name, [name, {{params}}] or {{'attack': name, ...}}; got {item!r}")
    if not out:
        raise ValueError("the sequence is empty")
    return out


class Suite(DefenseAttack):
    """Per-sample sequencer over defense-aware attacks (see module)."""

    name: ClassVar[str] = "suite"
    param_names: ClassVar[tuple[str, ...]] = DefenseAttack.param_names + ("sequence", "confirm_draws")

    def __init__(self, model: nn.Module, *, defense: nn.Module, noise: Any = None, sequence: Any = None,
                 confirm_draws: int = 4, **kwargs: Any):
        super().__init__(model, defense=defense, noise=noise, **kwargs)
        if confirm_draws < 1:
            raise ValueError(f"confirm_draws must be >= 1, got {confirm_draws!r}")
        self.confirm_draws = int(confirm_draws) if defense.needs_noise else 1
        from . import make_attack  # the registry imports this module lazily

        entries = _entries(default_sequence(defense) if sequence is None else sequence)
        if any(name == "suite" for name, _ in entries):
            raise ValueError("a suite cannot contain a suite")
        self.attacks = [make_attack(name, model, defense=defense, noise=noise, **{**kwargs, **own})
                        for name, own in entries]
        self.names = [name for name, _ in entries]
        self.sequence = [{"attack": n, **a.params()} for n, a in zip(self.names, self.attacks)]
        self._shared = {k: v for k, v in kwargs.items() if k not in _RUNTIME}
        self.reset()

    def params(self) -> dict[str, Any]:
        """The budget, the parameters given to every attack, and each attack's full parameters in order."""
        low = {"precision": self.precision} if self.precision != "fp32" else {}
        return {"eps": self.eps, **self._shared, "confirm_draws": self.confirm_draws, "sequence": self.sequence,
                "on_flag": self.defense.on_flag, **low}

    def reset(self) -> None:
        """Forget the record (one suite object per exported partition needs no reset)."""
        self._broken: list[torch.Tensor] = []
        self._counts = [{"ran": 0, "claimed": 0, "stalled": 0} for _ in self.attacks]
        self._linf: list[list[torch.Tensor]] = [[] for _ in self.attacks]

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        best = x.clone()
        broken = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        fallback = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        with torch.no_grad():
            alive = ~self.succeeded(x, y, generator)  # already wrong: nothing to attack
        for i, attack in enumerate(self.attacks):
            rows = alive.nonzero()[:, 0]
            if not len(rows):
                break
            adv = attack.perturb(x[rows], y[rows], generator)
            with torch.no_grad():
                moved = (adv != x[rows]).flatten(1).any(dim=1)
                hit = attack.succeeded(adv, y[rows], generator, max(attack.check_draws, self.confirm_draws)) & moved
                weak = moved & ~hit & ~fallback[rows]  # got through on some draw: better than the clean image
                best[rows[weak]], fallback[rows[weak]] = adv[weak], True
            counts = self._counts[i]
            counts["ran"] += len(rows)
            counts["claimed"] += int(hit.sum())
            counts["stalled"] += int((attack.stalled & ~hit).sum())
            self._linf[i].append(((adv - x[rows])[hit].flatten(1).abs().amax(dim=1) / self.eps).cpu())
            best[rows[hit]] = adv[hit]
            broken[rows[hit]] = i
            alive[rows[hit]] = False
        self._broken.append(broken.cpu())
        return best

    def record(self) -> dict[str, Any]:
        """``{"sequence": names, "broken_by": [index or -1 per attacked sample, in order], "indicators": [...]}``."""
        indicators = []
        for name, counts, linf in zip(self.names, self._counts, self._linf):
            ratios = torch.cat(linf) if linf else torch.zeros(0)
            median = float(ratios.median()) if len(ratios) else None
            indicators.append({"attack": name, **counts, "linf_ratio_median": median})
        broken = torch.cat(self._broken).tolist() if self._broken else []
        return {"sequence": list(self.names), "broken_by": broken, "indicators": indicators}
