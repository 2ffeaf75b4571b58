"""Minimal-margin attack: cross just past the pipeline's boundary, then shrink the perturbation.

Detectors learn what the attacks they were trained on look like, and those attacks overshoot (PGD
spends its whole budget). This attack runs the routes with no margin (``kappa = 0``, ``score_margin =
0``), stops each sample at its first success, then bisects the perturbation's length: the result is
the smallest multiple t·δ of the found perturbation δ that still succeeds on ``check_draws`` fresh
noise draws, the kind of near-boundary input DeepFool and C&W make and detectors tend to miss.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .defended import DefenseAttack


class MinMargin(DefenseAttack):
    """Routes at zero margin, then a per-sample bisection of the perturbation's length."""

    name: ClassVar[str] = "min-margin"
    param_names: ClassVar[tuple[str, ...]] = DefenseAttack.param_names + ("search_steps",)

    def __init__(self, model: nn.Module, *, search_steps: int = 10, check_draws: int = 4, kappa: float = 0.0,
                 score_margin: float = 0.0, **kwargs: Any):
        super().__init__(model, kappa=kappa, score_margin=score_margin, check_draws=check_draws, **kwargs)
        self.search_steps = int(search_steps)

    def _attack(self, x, y, generator, best, found) -> None:
        super()._attack(x, y, generator, best, found)
        delta = best - x
        low = torch.zeros(len(x), device=x.device)
        high = torch.ones(len(x), device=x.device)
        shape = (-1,) + (1,) * (x.ndim - 1)
        for _ in range(self.search_steps):
            mid = (low + high) / 2
            ok = self.succeeded(x + mid.view(shape) * delta, y, generator, self.check_draws) & found
            high = torch.where(ok, mid, high)
            low = torch.where(ok, low, mid)
        shrunk = x + high.view(shape) * delta
        keep = self.succeeded(shrunk, y, generator, self.check_draws) & found
        best[keep] = shrunk[keep]
