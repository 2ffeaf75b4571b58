"""The shared attack base: eval mode, device, precision, batching and clamping live here, once.

A subclass implements only `perturb`, the attack on one batch. Images are float tensors of shape
(N, C, H, W) with pixels in [0, 1]; normalisation is the model's job (see `producers.models.classifiers`).
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
    precision : ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the model's forward and backward run under
        `torch.autocast` at that precision, while images, perturbations and steps stay float32. On GPUs
        with tensor cores this is several times faster; docs/producers.md gives the measured effect on
        robust accuracy. ``fp16`` scales the loss before backward so small gradients do not underflow.
    channels_last : store the model and images channels-last (faster convolutions on GPUs); default:
        on CUDA only. Numerically the same computation.

    Subclasses take their own keyword-only parameters (``eps``, ``alpha``, ``steps``, …), store them
    unchanged, and list their names in `param_names` so `params()` can report them in table metadata.
    """

    name: ClassVar[str]
    param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, *, batch_size: int = 256, device: str | torch.device | None = None,
                 precision: str = "fp32", channels_last: bool | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model = model
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.precision = precision
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last

    def params(self) -> dict[str, Any]:
        """The attack's parameters, JSON-ready, for the table metadata (``precision`` when not fp32: it can
        change the result)."""
        low = {"precision": self.precision} if self.precision != "fp32" else {}
        return {**{p: getattr(self, p) for p in self.param_names}, **low}

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
        # Attacks need input gradients only: frozen weights spare every backward pass its weight gradients.
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)  # parameters only: the same numbers
        out = []
        try:
            for start in range(0, len(images), self.batch_size):
                x = images[start:start + self.batch_size].to(self.device, torch.float32, non_blocking=True)
                x = x.contiguous(memory_format=layout)
                y = labels[start:start + self.batch_size].to(self.device, torch.long, non_blocking=True)
                with self.autocast():
                    adv = self.perturb(x, y, generator).detach().clamp_(0.0, 1.0)
                out.append(adv.to("cpu", memory_format=torch.contiguous_format))
                if on_batch is not None:
                    on_batch(len(x))
        finally:
            self.model.train(was_training)
            for p in trainable:
                p.requires_grad_(True)
        return torch.cat(out) if out else images.new_empty(images.shape)

    # -- helpers for subclasses ----------------------------------------------------------------

    def autocast(self) -> torch.autocast:
        """The autocast context of `precision` (disabled for fp32)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32")

    def input_gradient(self, outputs: torch.Tensor, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``torch.autograd.grad(outputs, x)`` as float32, with loss scaling under fp16 (its gradients
        underflow to zero otherwise). `kwargs` go to `torch.autograd.grad` (``grad_outputs``, …)."""
        scale = _FP16_LOSS_SCALE if self.precision == "fp16" else 1.0
        if scale != 1.0:
            grad_outputs = kwargs.pop("grad_outputs", None)
            kwargs["grad_outputs"] = (torch.full_like(outputs, scale) if grad_outputs is None
                                      else grad_outputs * scale)
        (grad,) = torch.autograd.grad(outputs, x, **kwargs)
        return grad.float() / scale if scale != 1.0 else grad

    def loss_gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of the summed cross-entropy with respect to the input batch `x`."""
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(self.model(x).float(), y, reduction="sum")
        return self.input_gradient(loss, x)


PRECISIONS = ("fp32", "bf16", "fp16")
_FP16_LOSS_SCALE = 1024.0


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
