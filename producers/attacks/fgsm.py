"""Fast Gradient Sign Method (Goodfellow et al., 2015, https://arxiv.org/abs/1412.6572).

One step of size `eps` along the sign of the input gradient of the cross-entropy: the cheapest
L-inf attack, and the baseline the iterative ones (BIM, PGD, MIM) refine.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import Attack


class FGSM(Attack):
    """Untargeted FGSM in the L-inf ball of radius `eps` (pixel units in [0, 1]).

    Parameters
    ----------
    model : classifier mapping images in [0, 1] to logits.
    eps : L-inf budget; the single step has this size.
    batch_size, device, precision, channels_last : see `Attack` (keyword arguments).
    """

    name: ClassVar[str] = "fgsm"
    param_names: ClassVar[tuple[str, ...]] = ("eps",)

    def __init__(self, model: nn.Module, *, eps: float = 16 / 255, **runtime: Any):
        super().__init__(model, **runtime)
        self.eps = eps

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """x + eps * sign(grad_x CE(model(x), y)), clamped to [0, 1]; x (B, C, H, W), y (B,)."""
        grad = self.loss_gradient(x, y)
        return (x + self.eps * grad.sign()).clamp_(0.0, 1.0)
