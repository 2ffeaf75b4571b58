"""Carlini & Wagner L2 (2017): minimise ||delta||^2 + c * margin loss in tanh space, binary search on c.

Paper: https://arxiv.org/abs/1608.04644
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Attack

_TANH_SHRINK = 0.999999  # keeps atanh finite at pixels of exactly 0 or 1


class CarliniWagnerL2(Attack):
    """Untargeted C&W L2, batched; every sample keeps its own constant c and its own binary search.

    Images are written as ``(tanh(w) + 1) / 2``, so they stay in [0, 1] without clipping. For each of
    `binary_search_steps` values of c, Adam runs `steps` iterations on
    ``||x_adv - x||^2 + c * max(z_y - max_{j != y} z_j + confidence, 0)`` from the clean image. After
    each search step a sample's c is lowered (it succeeded: bisect towards the lower bound) or raised
    (bisect towards the upper bound, or times 10 while there is none). The smallest-L2 successful image
    of each sample is returned; a sample never successful comes back unchanged.

    Parameters
    ----------
    model, batch_size, device, precision, channels_last : see `Attack` (keyword arguments).
    steps : Adam iterations per binary-search step.
    lr : Adam learning rate in tanh space. The paper's 0.01 suits its 1,000+ steps; with 25 steps Adam
        moves each coordinate by about 25 * lr at most, and 0.01 fooled 21% of the digits SmallCNN's test
        images against 99.5% for 0.1 (ART's line-search C&W: 99.5%), so 0.1 is the default.
    binary_search_steps : values of c tried per sample.
    c_init : first value of c.
    confidence : logit margin (kappa) by which another class must beat the true one.
    """

    name = "cw"
    param_names = ("steps", "lr", "binary_search_steps", "c_init", "confidence")

    def __init__(self, model: nn.Module, *, steps: int = 25, lr: float = 0.1, binary_search_steps: int = 4,
                 c_init: float = 10.0, confidence: float = 0.0, **runtime: Any):
        super().__init__(model, **runtime)
        self.steps = steps
        self.lr = lr
        self.binary_search_steps = binary_search_steps
        self.c_init = c_init
        self.confidence = confidence

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Adversarial batch (B, C, H, W) against true labels `y` (B,); `generator` is unused."""
        n = len(x)
        w_clean = torch.atanh((2 * x - 1) * _TANH_SHRINK)
        c = torch.full((n,), float(self.c_init), device=x.device)
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), float("inf"), device=x.device)
        best_l2 = torch.full((n,), float("inf"), device=x.device)
        best_adv = x.clone()
        for _ in range(self.binary_search_steps):
            w = w_clean.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=self.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            for step in range(self.steps + 1):
                adv = (torch.tanh(w) + 1) / 2
                logits = self.model(adv).float()
                margin = _true_class_margin(logits, y)  # (B,) > 0 while y still wins
                l2_sq = (adv - x).flatten(1).pow(2).sum(1)
                with torch.no_grad():
                    success = margin + self.confidence < 0
                    better = success & (l2_sq < best_l2)
                    best_l2 = torch.where(better, l2_sq, best_l2)
                    best_adv[better] = adv[better]
                    succeeded |= success
                if step == self.steps:  # this last pass only scores the final iterate
                    break
                loss = l2_sq + c * (margin + self.confidence).clamp_min(0)
                # samples are independent, so one summed loss serves all; autograd.grad leaves the
                # model's parameter gradients alone
                w.grad = self.input_gradient(loss.sum(), w)
                optimizer.step()
            upper = torch.where(succeeded, torch.minimum(upper, c), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, c))
            c = torch.where(upper.isfinite(), (lower + upper) / 2, c * 10)
        return best_adv


def _true_class_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j for logits (B, K) and labels (B,); shape (B,)."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true_logit - others.max(1).values
