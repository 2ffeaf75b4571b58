"""Projected Gradient Descent (Madry et al., 2018, https://arxiv.org/abs/1706.06083).

BIM from a uniform random start in the L-inf ball: `steps` signed-gradient steps of size `alpha`,
each projected back to the ball around the original and to [0, 1].
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import Attack


class PGD(Attack):
    """Untargeted L-inf PGD with an optional random start (pixel units in [0, 1]).

    Parameters
    ----------
    model : classifier mapping images in [0, 1] to logits.
    eps : L-inf budget.
    alpha : step size.
    steps : number of gradient steps.
    random_start : start from x + U(-eps, eps) (drawn with the call's `generator`) instead of x.
    batch_size, device, precision, channels_last : see `Attack` (keyword arguments).
    """

    name: ClassVar[str] = "pgd"
    param_names: ClassVar[tuple[str, ...]] = ("eps", "alpha", "steps", "random_start")

    def __init__(self, model: nn.Module, *, eps: float = 16 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, **runtime: Any):
        super().__init__(model, **runtime)
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.random_start = random_start

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Adversarial batch (B, C, H, W) within `eps` of `x` (B, C, H, W), for labels `y` (B,)."""
        # The ball intersected with [0, 1], computed once: one min/max pair projects onto both.
        lower, upper = (x - self.eps).clamp_(min=0.0), (x + self.eps).clamp_(max=1.0)
        x_adv = x.clone()
        if self.random_start:
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_adv = (x_adv + self.eps * (2 * noise - 1)).clamp_(0.0, 1.0)
        for _ in range(self.steps):
            x_adv = x_adv + self.alpha * self.loss_gradient(x_adv, y).sign()
            x_adv = torch.min(torch.max(x_adv, lower), upper)
        return x_adv
