"""Basic Iterative Method (Kurakin et al., 2017, https://arxiv.org/abs/1607.02533).

FGSM repeated `steps` times with step `alpha`, projected back to the L-inf ball around the original
and to [0, 1] after every step. It starts at the clean image; PGD is the same loop from a random start.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import Attack


class BIM(Attack):
    """Untargeted BIM (also "I-FGSM") in the L-inf ball of radius `eps` (pixel units in [0, 1]).

    Parameters
    ----------
    model : classifier mapping images in [0, 1] to logits.
    eps : L-inf budget.
    alpha : step size; None means ``eps / steps``, so the last step can just reach the boundary.
    steps : number of gradient steps.
    batch_size, device, precision, channels_last : see `Attack` (keyword arguments).
    """

    name: ClassVar[str] = "bim"
    param_names: ClassVar[tuple[str, ...]] = ("eps", "alpha", "steps")

    def __init__(self, model: nn.Module, *, eps: float = 16 / 255, alpha: float | None = None, steps: int = 10,
                 **runtime: Any):
        super().__init__(model, **runtime)
        self.eps = eps
        self.alpha = alpha
        self.steps = steps

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Adversarial batch (B, C, H, W) within `eps` of `x` (B, C, H, W), for labels `y` (B,)."""
        alpha = self.eps / self.steps if self.alpha is None else self.alpha
        lower, upper = (x - self.eps).clamp_(min=0.0), (x + self.eps).clamp_(max=1.0)
        x_adv = x.clone()
        for _ in range(self.steps):
            x_adv = x_adv + alpha * self.loss_gradient(x_adv, y).sign()
            x_adv = torch.min(torch.max(x_adv, lower), upper)
        return x_adv
