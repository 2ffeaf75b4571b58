"""APGD (Croce & Hein, ICML 2020) on the defended output: ``apgd-ce``, ``apgd-dlr`` and ``apgd-t``.

The pipeline's answer is a distribution over C + 1 outcomes (C classes, then abstain), made
differentiable from the mirror (`defended_probs`):

    p_def = (1 − s)·p_f + s·q        s = sigmoid((score − threshold) / (spread · T))

p_f = softmax(model logits); q = softmax(corrected) when flagged rows are corrected, all mass on abstain
when they are rejected, and q[j] = p_f[j]·p_c[j] with the rest on abstain when they are kept only if the
corrector agrees. No detector: s = 1 (a corrector on every row); bare model: p_def = p_f. Averaged over
``eot`` noise draws per step.

Losses (minimised): ``ce`` = −log Σ_{j∉{y, abstain}} p_def[j] (targeted: −log p_def[t]); ``dlr`` =
Croce's difference of logits ratio on log p_def, where the "true" side is max(log p_def[y], log p_def[abstain]):
an abstention is as good as the right answer for the defender. ``apgd-t`` runs targeted DLR once per each of
the ``targets`` highest wrong classes of the clean model logits, on the samples still unbroken.

The step: η starts at 2ε; momentum 0.75; at the checkpoints w_j (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j +
max(p_j − p_{j−1} − 0.03, 0.06)) η halves and the iterate returns to the best one (lowest loss) when fewer
than ρ = 0.75 of the steps since the last checkpoint improved the loss, or when neither η nor the best loss
changed since it. Successes are checked with the exact pipeline on ``check_draws`` fresh draws every step.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .defended import DefenseAttack, _StallTracker, top_wrong_classes

_TINY = 1e-300  # float64


def defended_probs(attack: DefenseAttack, x: torch.Tensor, generator: torch.Generator | None,
                   temperature: float = 1.0) -> torch.Tensor:
    """p_def (B, C + 1) float64, the last column = abstain, averaged over ``attack.eot`` draws (differentiable)."""
    out = attack.defense(*attack._forward(x, generator, attack.eot))
    p_f = F.softmax(out.logits.double(), dim=1)
    zero = p_f.new_zeros(len(p_f), 1)
    p_model = torch.cat([p_f, zero], dim=1)
    if out.score is None and out.corrected is None:
        p = p_model
    else:
        on_flag = attack.defense.on_flag
        if on_flag == "reject" or out.corrected is None:
            q = torch.cat([torch.zeros_like(p_f), zero + 1.0], dim=1)
        elif on_flag == "correct":
            q = torch.cat([F.softmax(out.corrected.double(), dim=1), zero], dim=1)
        else:  # agree
            both = p_f * F.softmax(out.corrected.double(), dim=1)
            q = torch.cat([both, (1.0 - both.sum(dim=1, keepdim=True)).clamp(min=0.0)], dim=1)
        if out.score is None:
            p = q
        else:
            t = (out.score.double() - out.threshold) / (attack._score_scale.double() * temperature)
            p = torch.sigmoid(-t)[:, None] * p_model + torch.sigmoid(t)[:, None] * q
    return p.view(attack.eot, len(x), -1).mean(dim=0)


def defended_loss(log_p: torch.Tensor, y: torch.Tensor, loss: str, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss (B,) to minimise on log p_def (B, C + 1), untargeted or towards `target` (B,)."""
    c = log_p.shape[1] - 1
    wrong = torch.ones_like(log_p, dtype=torch.bool)
    wrong[:, c] = False
    wrong.scatter_(1, y[:, None], False)
    if loss == "ce":
        if target is None:
            return -torch.logsumexp(log_p.masked_fill(~wrong, -math.inf), dim=1)
        return -log_p.gather(1, target[:, None])[:, 0]
    true = torch.maximum(log_p.gather(1, y[:, None])[:, 0], log_p[:, c])
    top = log_p.sort(dim=1, descending=True).values
    if target is None:
        other = log_p.masked_fill(~wrong, -math.inf).max(dim=1).values
        return (true - other) / (top[:, 0] - top[:, 2] + 1e-12)
    other = log_p.gather(1, target[:, None])[:, 0]
    return (true - other) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def checkpoints(steps: int) -> set[int]:
    """Croce & Hein's checkpoint iterations w_j for a run of `steps` iterations."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return {math.ceil(round(q * steps, 6)) for q in p[1:] if q <= 1.0} - {0}


class APGD(DefenseAttack):
    """APGD on the defended distribution (see module); ``loss`` "ce" or "dlr", ``targets`` > 0 = targeted."""

    name: ClassVar[str] = "apgd"
    param_names: ClassVar[tuple[str, ...]] = DefenseAttack.param_names + ("loss", "targets", "temperature", "rho")

    def __init__(self, model: nn.Module, *, loss: str = "ce", targets: int = 0, temperature: float = 1.0,
                 rho: float = 0.75, restarts: int = 1, **kwargs: Any):
        super().__init__(model, restarts=restarts, **kwargs)
        if loss not in ("ce", "dlr"):
            raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
        if targets < 0:
            raise ValueError(f"targets must be >= 0, got {targets!r}")
        self.loss, self.targets, self.temperature, self.rho = loss, int(targets), float(temperature), float(rho)

    def routes(self):
        return ("defended",)

    def _attack(self, x, y, generator, best, found) -> None:
        order = top_wrong_classes(self.model, x, y, self.targets) if self.targets else [None]
        for target in order:
            for restart in range(self.restarts):
                rows = (~found).nonzero()[:, 0]
                if not len(rows):
                    return
                t = None if target is None else target[rows]
                adv, hit, stalled = self._apgd(x[rows], y[rows], t, generator, random_start=self.restarts > 1)
                best[rows[hit]] = adv[hit]
                found[rows] |= hit
                self.stalled[rows] = stalled & ~hit

    def _loss_and_grad(self, z, y, t, generator):
        z = z.detach().requires_grad_(True)
        p = defended_probs(self, z, generator, self.temperature)
        loss = defended_loss(p.clamp(min=_TINY).log(), y, self.loss, t)
        return loss.detach(), self.input_gradient(loss.sum(), z)

    def _apgd(self, xs, ys, t, generator, random_start: bool):
        """One APGD run on a sub-batch: (latest successful iterate, success (B,), stalled (B,))."""
        lower, upper = (xs - self.eps).clamp(min=0.0), (xs + self.eps).clamp(max=1.0)
        project = lambda z: torch.min(torch.max(z, lower), upper)  # noqa: E731
        cur = xs.clone()
        if random_start:
            cur = project(xs + self.eps * (2 * torch.rand(xs.shape, generator=generator, device=xs.device) - 1))
        shape = (-1,) + (1,) * (xs.ndim - 1)
        eta = torch.full((len(xs),), 2 * self.eps, device=xs.device)
        adv, hit = xs.clone(), torch.zeros(len(xs), dtype=torch.bool, device=xs.device)
        marks, tracker = checkpoints(self.steps), _StallTracker(self.steps)
        prev, last_loss = cur, None
        best_loss = best_at_mark = None
        x_best = g_best = None
        count = torch.zeros(len(xs), device=xs.device)
        reduced, last_mark = torch.zeros(len(xs), dtype=torch.bool, device=xs.device), 0
        for k in range(self.steps):
            loss, grad = self._loss_and_grad(cur, ys, t, generator)
            with torch.no_grad():
                tracker.update(k, loss)
                if best_loss is None:
                    best_loss, best_at_mark, x_best, g_best = loss.clone(), loss.clone(), cur.clone(), grad.clone()
                else:
                    count += (loss < last_loss).float()
                    better = loss < best_loss
                    best_loss = torch.where(better, loss, best_loss)
                    x_best[better], g_best[better] = cur[better], grad[better]
                last_loss = loss
                if k in marks:
                    reduce = (count < self.rho * (k - last_mark)) | (~reduced & (best_loss >= best_at_mark))
                    eta = torch.where(reduce, eta / 2, eta)
                    back = reduce.view(shape)
                    cur, grad = torch.where(back, x_best, cur), torch.where(back, g_best, grad)
                    prev = torch.where(back, cur, prev)
                    reduced, best_at_mark, last_mark, count = reduce, best_loss.clone(), k, count.zero_()
                z = project(cur - eta.view(shape) * grad.sign())
                momentum = 0.75 if k > 0 else 1.0
                nxt = project(cur + momentum * (z - cur) + (1 - momentum) * (cur - prev))
                prev, cur = cur, nxt
                ok = self.succeeded(cur, ys, generator, self.check_draws)
                adv[ok], hit = cur[ok], hit | ok
        return adv, hit, tracker.stalled()


class APGDCE(APGD):
    """Untargeted APGD with the cross-entropy towards any wrong answer."""

    name: ClassVar[str] = "apgd-ce"


class APGDDLR(APGD):
    """Untargeted APGD with the DLR loss."""

    name: ClassVar[str] = "apgd-dlr"

    def __init__(self, model: nn.Module, *, loss: str = "dlr", **kwargs: Any):
        super().__init__(model, loss=loss, **kwargs)


class APGDT(APGD):
    """Targeted APGD-DLR at each of the top ``targets`` (default 3) wrong classes of the clean model."""

    name: ClassVar[str] = "apgd-t"

    def __init__(self, model: nn.Module, *, loss: str = "dlr", targets: int = 3, **kwargs: Any):
        super().__init__(model, loss=loss, targets=targets, **kwargs)
