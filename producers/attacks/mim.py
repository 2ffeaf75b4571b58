"""Momentum Iterative Method (Dong et al., 2018, https://arxiv.org/abs/1710.06081).

BIM whose step follows an accumulated gradient g <- decay * g + grad / ||grad||_1 (per sample), so
the direction is stabilised across steps; each step is alpha * sign(g), projected to the L-inf ball
around the original and to [0, 1].
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import Attack


class MIM(Attack):
    """Untargeted L-inf MI-FGSM (pixel units in [0, 1]).

    Parameters
    ----------
    model : classifier mapping images in [0, 1] to logits.
    eps : L-inf budget.
    alpha : step size; None means ``eps / steps`` as in the paper.
    steps : number of gradient steps.
    decay : momentum factor mu (1.0 in the paper: a plain running sum of normalised gradients).
    batch_size, device, precision, channels_last : see `Attack` (keyword arguments).
    """

    name: ClassVar[str] = "mim"
    param_names: ClassVar[tuple[str, ...]] = ("eps", "alpha", "steps", "decay")

    def __init__(self, model: nn.Module, *, eps: float = 16 / 255, alpha: float | None = None, steps: int = 10,
                 decay: float = 1.0, **runtime: Any):
        super().__init__(model, **runtime)
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.decay = decay

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Adversarial batch (B, C, H, W) within `eps` of `x` (B, C, H, W), for labels `y` (B,)."""
        alpha = self.eps / self.steps if self.alpha is None else self.alpha
        lower, upper = (x - self.eps).clamp_(min=0.0), (x + self.eps).clamp_(max=1.0)
        x_adv = x.clone()
        momentum = torch.zeros_like(x)
        for _ in range(self.steps):
            grad = self.loss_gradient(x_adv, y)
            # Per-sample L1 norm (B, 1, 1, 1); a zero gradient stays zero instead of becoming NaN.
            l1 = grad.abs().sum(dim=tuple(range(1, grad.ndim)), keepdim=True).clamp_min(1e-12)
            momentum = self.decay * momentum + grad / l1
            x_adv = x_adv + alpha * momentum.sign()
            x_adv = torch.min(torch.max(x_adv, lower), upper)
        return x_adv
