"""The shared attack base: eval mode, device, batching and clamping live here, once.

A subclass implements only `perturb`, the attack on one batch. Images are float tensors of shape
(N, C, H, W) with pixels in [0, 1]; normalisation is the model's job (see `producers.models`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F


class Attack(ABC):
    """An evasion attack on a classifier that maps images in [0, 1] to logits.

    Parameters
    ----------
    model : the classifier; put in eval mode for the attack and restored afterwards.
    batch_size : images attacked at once.
    device : where to run (default: the model's device).

    Subclasses take their own keyword-only parameters (``eps``, ``alpha``, ``steps``, …), store them
    unchanged, and list their names in `param_names` so `params()` can report them in table metadata.
    """

    name: ClassVar[str]
    param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, *, batch_size: int = 256, device: str | torch.device | None = None):
        self.model = model
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _model_device(model)

    def params(self) -> dict[str, Any]:
        """The attack's parameters, JSON-ready, for the table metadata."""
        return {p: getattr(self, p) for p in self.param_names}

    @abstractmethod
    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Adversarial version of one batch `x` (B, C, H, W) on `self.device` with true labels `y` (B,)."""

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Attack `images` (N, C, H, W) in [0, 1] with true `labels` (N,); returns (N, C, H, W) on the CPU.

        `generator` (on `self.device`) drives any randomness, for reproducible runs; `on_batch(n)` is
        called after each batch of n images (progress bars).
        """
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for start in range(0, len(images), self.batch_size):
                x = images[start:start + self.batch_size].to(self.device, torch.float32)
                y = labels[start:start + self.batch_size].to(self.device, torch.long)
                adv = self.perturb(x, y, generator).detach().clamp_(0.0, 1.0)
                out.append(adv.cpu())
                if on_batch is not None:
                    on_batch(len(x))
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else images.new_empty(images.shape)

    # -- helpers for subclasses ----------------------------------------------------------------

    def loss_gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of the summed cross-entropy with respect to the input batch `x`."""
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(self.model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        return grad


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
