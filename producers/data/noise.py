"""Noise queries for the odds test: logits of K noise-perturbed copies of each input image.

The recipe names each query's noise kind and scale, so a detector can later use all queries or a subset
(the recipe is stored in the table metadata under ``noise``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ProducerError

NOISE_KINDS = ("gaussian", "uniform", "sign")
DEFAULT_NOISE = "gaussian:0.05,gaussian:0.1,uniform:0.1,sign:0.05"


@dataclass(frozen=True)
class NoiseRecipe:
    """One (kind, scale) per query. gaussian: N(0, scale^2); uniform: U(-scale, scale); sign: ±scale."""

    queries: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, spec: str, k: int) -> NoiseRecipe:
        """`k` queries cycling through ``kind:scale`` items, e.g. ``"gaussian:0.05,sign:0.02"``."""
        items = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            kind, _, scale = item.partition(":")
            if kind not in NOISE_KINDS:
                raise ProducerError(f"unknown noise kind {kind!r} in {spec!r}; known: {list(NOISE_KINDS)}")
            try:
                value = float(scale)
            except ValueError:
                raise ProducerError(f"noise item {item!r} needs a numeric scale, e.g. {kind}:0.05") from None
            if not value > 0:
                raise ProducerError(f"noise scale must be positive, got {item!r}")
            items.append((kind, value))
        if not items:
            raise ProducerError(f"empty noise recipe {spec!r}")
        if k < 1:
            raise ProducerError(f"the number of noise queries must be at least 1, got {k}")
        return cls(tuple(items[i % len(items)] for i in range(k)))

    @classmethod
    def from_metadata(cls, noise: dict[str, Any] | None) -> NoiseRecipe | None:
        """The recipe a table's ``noise`` metadata records (None when the table has no noise queries)."""
        if not noise:
            return None
        try:
            return cls(tuple((q["kind"], float(q["scale"])) for q in noise["recipe"]))
        except (KeyError, TypeError, ValueError):
            raise ProducerError(f"the table's noise metadata is not a recipe: {noise!r}") from None

    def __len__(self) -> int:
        return len(self.queries)

    def to_metadata(self) -> dict[str, Any]:
        return {"queries": len(self), "recipe": [{"kind": k, "scale": s} for k, s in self.queries],
                "clip": [0.0, 1.0]}

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
    """Logits (N, K, C) of K noisy copies (clipped to [0, 1]) of each of `images` (N, channels, H, W).

    At most `batch_size` noisy images go through the model at once.
    """
    device = torch.device(device)
    k = len(recipe)
    per_chunk = max(1, batch_size // k)
    out = []
    for start in range(0, len(images), per_chunk):
        x = images[start:start + per_chunk].to(device)
        noisy = (x.unsqueeze(1) + recipe.sample(x.shape, generator, device)).clamp_(0.0, 1.0)
        logits = model(noisy.flatten(0, 1))
        out.append(logits.view(len(x), k, -1).float().cpu())
    return torch.cat(out)
