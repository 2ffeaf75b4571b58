"""Noise queries for the odds test: logits of K noise-perturbed copies of each input image.

The recipe itself (kinds, parsing, the ``noise`` metadata the table records) is the core's
`logitguard.noise.NoiseRecipe`, written once; this module adds its torch sampler, which runs on the model's
device, and `noise_queries`. `logitguard.noisy_copies` draws the same noise in NumPy (equal in distribution).
"""

from __future__ import annotations

import torch
from torch import nn

from logitguard.noise import DEFAULT_NOISE, NOISE_KINDS
from logitguard.noise import NoiseRecipe as CoreRecipe

from ..errors import ProducerError

__all__ = ["DEFAULT_NOISE", "NOISE_KINDS", "NoiseRecipe", "noise_queries"]


class NoiseRecipe(CoreRecipe):
    """`logitguard.noise.NoiseRecipe` (parse, metadata; errors are `ProducerError`s) with a torch sampler.
    gaussian: N(0, scale^2); uniform: U(-scale, scale); sign: ±scale."""

    error = ProducerError

    def sample(self, shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Noise of shape (B, K, *image_shape) for a batch shape (B, *image_shape)."""
        b, *rest = shape
        out = torch.empty((b, len(self), *rest), device=device)
        for q, (kind, scale) in enumerate(self.queries):  # K is small; each draw is batched over B
            view = out[:, q]
            if kind == "gaussian":
                view.normal_(0.0, scale, generator=generator)
            elif kind == "uniform":
                view.uniform_(-scale, scale, generator=generator)
            else:
                view.bernoulli_(0.5, generator=generator).mul_(2 * scale).sub_(scale)
        return out


@torch.no_grad()
def noise_queries(
    model: nn.Module,
    images: torch.Tensor,
    recipe: NoiseRecipe,
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 2048,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits (N, K, C) of K noisy copies (clipped to ``recipe.clip``, [0, 1]) of each of `images` (N, channels, H, W).

    At most `batch_size` noisy images go through the model at once.
    """
    device = torch.device(device)
    k = len(recipe)
    per_chunk = max(1, batch_size // k)
    out = []
    for start in range(0, len(images), per_chunk):
        x = images[start:start + per_chunk].to(device)
        noisy = (x.unsqueeze(1) + recipe.sample(x.shape, generator, device)).clamp_(*recipe.clip)
        logits = model(noisy.flatten(0, 1))
        out.append(logits.view(len(x), k, -1).float().cpu())
    return torch.cat(out)
