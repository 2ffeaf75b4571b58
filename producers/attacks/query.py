"""The shared base of query attacks: the attacker only queries the pipeline as deployed (threat model ``query``).

No gradient is ever taken. One *query* is one image sent to the service: the model runs on it and, when the
pipeline reads noise queries, on K fresh noisy copies drawn from the table's noise recipe (the defender draws
new noise for every request, so asking twice can give two answers). The attacker sees what the service returns
(`logitguard.serve`: ``model_label``, ``flagged``, ``score``, ``label``) and, with ``returns="scores"``, the
model's logits as well; with ``returns="labels"`` only the final label (-1 = abstained).

Subclasses implement `_search(x, y, generator) -> (adversarial images, queries to success)`; the base counts
queries per sample and keeps them for the threat metadata (`take_queries`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from logitguard.defenses.decision import ABSTAIN, flag

from .defended import DefenseAttack

RETURNS = ("scores", "labels")


@dataclass
class Answer:
    """What the service returns for a batch of B queries (scores only where the attacker sees them)."""

    label: torch.Tensor  # (B,) int64, ABSTAIN (-1) where rejected
    logits: torch.Tensor | None = None  # (B, C) the model's logits
    flagged: torch.Tensor | None = None  # (B,) bool; None without a detector
    score: torch.Tensor | None = None  # (B,) float64 detector score; None without a detector
    threshold: float | None = None


class QueryAttack(DefenseAttack):
    """Base for L-inf attacks that see only the service's answers (see module).

    Parameters
    ----------
    model, defense, noise : as `DefenseAttack` (the pipeline mirror stands in for the deployed service: its
        decisions equal the core's).
    eps : L-inf budget.
    queries : query budget per sample (the first query is the clean image).
    confirm : where the pipeline draws noise, a wrong answer is asked again this many times (each a query) and
        counts as a success only when every answer is wrong: an attacker that stops at one lucky noise draw is
        mostly judged robust on fresh draws. Ignored (0) for a pipeline that reads no noise.
    """

    returns: ClassVar[str] = "labels"
    param_names: ClassVar[tuple[str, ...]] = ("eps", "queries", "confirm")

    def __init__(self, model: nn.Module, *, defense: nn.Module, noise: Any = None, eps: float = 16 / 255,
                 queries: int = 1000, confirm: int = 2, **runtime: Any):
        super().__init__(model, defense=defense, noise=noise, eps=eps, **runtime)
        if not (isinstance(queries, (int, np.integer)) and queries >= 2):
            raise ValueError(f"queries must be an integer >= 2, got {queries!r}")
        if not (isinstance(confirm, (int, np.integer)) and confirm >= 0):
            raise ValueError(f"confirm must be an integer >= 0, got {confirm!r}")
        self.queries = int(queries)
        self.confirm = int(confirm)
        self._counts: list[np.ndarray] = []

    def params(self) -> dict[str, Any]:
        low = {"precision": self.precision} if self.precision != "fp32" else {}
        return {**{p: getattr(self, p) for p in self.param_names}, "returns": self.returns,
                "on_flag": self.defense.on_flag, **low}

    # -- the service -------------------------------------------------------------------------------

    @torch.no_grad()
    def ask(self, x: torch.Tensor, generator: torch.Generator | None) -> Answer:
        """The service's answer to one query per image of `x` (B, C, H, W), with fresh noise for each."""
        logits, noisy, column = self._forward(x, generator)
        label = self.defense.decide(logits, noisy, column)
        if self.returns == "labels":
            return Answer(label)
        out = self.defense(logits, noisy, column)
        flagged = None if out.score is None else flag(out.score, out.threshold)
        return Answer(label, logits.float(), flagged, out.score, out.threshold)

    @staticmethod
    def broken(answer: Answer, y: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the answer is a wrong label (an abstention is a failure for the attacker)."""
        return (answer.label != y) & (answer.label != ABSTAIN)

    # -- the run -----------------------------------------------------------------------------------

    @torch.no_grad()
    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        adv, used = self._search(x, y, generator)
        if (used > self.queries).any():  # the budget is the contract: a bug here would inflate the attacker
            raise RuntimeError(f"{self.name} spent more than {self.queries} queries on a sample")
        self._counts.append(used.cpu().numpy().astype(np.int64))
        return adv

    def take_queries(self) -> np.ndarray:
        """Queries each sample's success took (-1 = not broken), in the order attacked since the last call."""
        out = np.concatenate(self._counts) if self._counts else np.zeros(0, np.int64)
        self._counts = []
        return out

    def _search(self, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(adversarial images (B, C, H, W) within eps, else the clean image; queries to success (B,), -1 if none)."""
        raise NotImplementedError

    def _confirmed(self, images: torch.Tensor, y: torch.Tensor, hit: torch.Tensor, spent: torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
        """`hit` (B,) where `confirm` more answers on `images` are wrong too (B,); each re-ask adds to `spent`
        (B,) in place, never past the budget (a claim left unconfirmed is no success)."""
        if not self.defense.needs_noise:
            return hit
        ok = hit.clone()
        for _ in range(self.confirm):
            ok &= spent < self.queries
            rows = ok.nonzero()[:, 0]
            if not len(rows):
                break
            spent[rows] += 1
            ok[rows] &= self.broken(self.ask(images[rows], generator), y[rows])
        return ok

    def _first(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None):
        """Query the clean images: (answer, broken (B,), used (B,): queries to success or -1, spent (B,))."""
        answer = self.ask(x, generator)
        spent = torch.ones(len(x), dtype=torch.long, device=x.device)
        hit = self._confirmed(x, y, self.broken(answer, y), spent, generator)
        return answer, hit, torch.where(hit, spent, -1), spent
