"""Input sensitivity (InSen, GRED / seed 002): how strongly the loss reacts to each pixel.

For an image x (pixels in [0, 1]) and the model's own prediction ŷ = argmax f(x), the InSen map is
g = |∂ CE(f(x), ŷ) / ∂x| (one value per pixel and channel). The table stores a fixed summary of g per row
(column ``insen``, docs/tables.md), so the core can use it without images:

    INSEN_STATS = log mean g, log ‖g‖₂, log max g, top-1% share, top-10% share

(logs of ``value + 1e-12``; a share is the fraction of Σg held by the largest 1% / 10% of the entries).
Adversarial inputs sit near a decision boundary, where the loss of the predicted class is steep and its
gradient concentrated, which is what GRED's detector exploits.

`insen_maps` with ``create_graph=True`` keeps the graph for double backpropagation: an attack that wants its
image to look insensitive (the adaptive attack on the ``insen`` detector) differentiates these statistics
with respect to x again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

INSEN_STATS = ("log_mean", "log_l2", "log_max", "top1_share", "top10_share")
_EPS = 1e-12


def insen_maps(model: nn.Module, x: Tensor, *, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """(g, logits): InSen maps g (N, C, H, W), ≥ 0, and the logits (N, classes) of `x` (N, C, H, W).

    With ``create_graph=False`` both come back detached; with True, g stays differentiable in x (and x need
    not require grad beforehand).
    """
    with torch.enable_grad():
        x = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        logits = model(x)
        loss = F.cross_entropy(logits, logits.argmax(1).detach(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    g = grad.abs()
    return (g, logits) if create_graph else (g.detach(), logits.detach())


def insen_summary(g: Tensor) -> Tensor:
    """The ``insen`` column (N, 5) from maps g (N, …): differentiable, in `INSEN_STATS` order."""
    flat = g.flatten(1).float()
    total = flat.sum(1)
    n = flat.shape[1]
    top = flat.topk(max(1, n // 10), dim=1).values  # sorted descending: the top 1% are its first entries
    top1 = top[:, :max(1, n // 100)].sum(1)
    return torch.stack([
        (total / n + _EPS).log(),
        (flat.square().sum(1) + _EPS).sqrt().log(),
        (top[:, 0] + _EPS).log(),
        top1 / (total + _EPS),
        top.sum(1) / (total + _EPS),
    ], dim=1)


def insen_stats(model: nn.Module, x: Tensor, *, create_graph: bool = False) -> Tensor:
    """`insen_summary(insen_maps(model, x))`: the (N, 5) statistics the producer exports."""
    g, _ = insen_maps(model, x, create_graph=create_graph)
    return insen_summary(g)
