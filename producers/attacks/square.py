"""Square Attack, L-inf (Andriushchenko et al., ECCV 2020): random search with square updates, scores only.

The attacker sees what a service that returns scores gives back (`QueryAttack` with ``returns="scores"``): the
model's logits, the detector's score and flag, and the final label. Its loss (minimised) is

    max(margin, 0) + score_weight * max((score - threshold) / spread + score_margin, 0)

with margin = logit_y − max_{j≠y} logit_j and spread the detector scores' spread over the batch's clean queries
(the attacker can measure it: the service returns scores). So it lowers the margin while the model is still
right, and pays for every step that takes the score toward or past the threshold: it wants a wrong label that
the detector lets through. Without a detector the loss is the margin alone (the paper's margin loss).

Algorithm (written from the paper): start from vertical stripes of ±eps (one sign per column and channel);
each iteration, draw a window of side s at a random place and set it to ±eps per channel, query, and keep the
candidate when the loss improves. The window's share p of the image follows the paper's schedule, halving at
fixed fractions of the query budget (rescaled to 10,000 queries) from ``p_init`` (0.8, AutoAttack's L-inf
setting). A sample stops at the first answer that is a wrong, non-abstained label (confirmed by ``confirm`` more
answers where the pipeline draws noise, `QueryAttack`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from .query import Answer, QueryAttack

# the paper's schedule: p halves each time the query count (out of 10,000) passes one of these
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init: float, it: int, n_iters: int) -> float:
    """Share of the image the square covers at iteration `it` of `n_iters` (the paper's schedule)."""
    scaled = int(it / max(n_iters, 1) * 10000)
    return p_init / 2 ** sum(scaled > t for t in _HALVINGS)


class Square(QueryAttack):
    """Score-based L-inf Square Attack through a pipeline's service (see module).

    Parameters: `QueryAttack`'s (``eps``, ``queries``) and ``p_init`` (initial square share), ``score_weight``
    (loss units per detector-score spread), ``score_margin`` (how far under the threshold to aim, in spreads).
    """

    name = "square"
    returns: ClassVar[str] = "scores"
    param_names: ClassVar[tuple[str, ...]] = ("eps", "queries", "confirm", "p_init", "score_weight",
                                              "score_margin")

    def __init__(self, model: nn.Module, *, p_init: float = 0.8, score_weight: float = 5.0,
                 score_margin: float = 0.25, **kwargs: Any):
        super().__init__(model, **kwargs)
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        self.p_init, self.score_weight, self.score_margin = float(p_init), float(score_weight), float(score_margin)

    def _loss(self, answer: Answer, y: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        logits = answer.logits
        true = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        loss = (true - other).double().clamp(min=0.0)
        if answer.score is not None:
            excess = (answer.score - answer.threshold) / spread + self.score_margin
            loss = loss + self.score_weight * excess.clamp(min=0.0)
        return loss

    def _search(self, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        dev, eps = x.device, self.eps
        lower, upper = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
        answer, done, used, spent = self._first(x, y, generator)
        spread = torch.ones((), dtype=torch.float64, device=dev)
        if answer.score is not None and b > 1:
            spread = answer.score.std().clamp(min=1e-6)
        best = x.clone()
        # vertical stripes: one ±eps per channel and column
        signs = torch.randint(0, 2, (b, c, 1, w), generator=generator, device=dev).to(x.dtype) * 2 - 1
        current = torch.min(torch.max(x + eps * signs, lower), upper)
        loss = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
        rows = (~done & (spent < self.queries)).nonzero()[:, 0]
        self._step(current[rows], rows, y, spread, generator, current, loss, best, done, used, spent,
                   accept_all=True)
        hh = torch.arange(h, device=dev).view(1, 1, h, 1)
        ww = torch.arange(w, device=dev).view(1, 1, 1, w)
        n_iters = self.queries - 2
        for it in range(n_iters):
            rows = (~done & (spent < self.queries)).nonzero()[:, 0]
            if not len(rows):
                break
            s = int(round(math.sqrt(square_fraction(self.p_init, it, n_iters) * h * w)))
            s = min(max(s, 1), h - 1, w - 1)
            n = len(rows)
            r0 = torch.randint(0, h - s + 1, (n, 1, 1, 1), generator=generator, device=dev)
            c0 = torch.randint(0, w - s + 1, (n, 1, 1, 1), generator=generator, device=dev)
            window = (hh >= r0) & (hh < r0 + s) & (ww >= c0) & (ww < c0 + s)
            value = torch.randint(0, 2, (n, c, 1, 1), generator=generator, device=dev).to(x.dtype) * 2 - 1
            moved = torch.min(torch.max(x[rows] + eps * value, lower[rows]), upper[rows])
            candidate = torch.where(window, moved, current[rows])
            self._step(candidate, rows, y, spread, generator, current, loss, best, done, used, spent)
        return best, used

    def _step(self, candidate: torch.Tensor, rows: torch.Tensor, y: torch.Tensor, spread: torch.Tensor,
              generator: torch.Generator | None, current: torch.Tensor, loss: torch.Tensor, best: torch.Tensor,
              done: torch.Tensor, used: torch.Tensor, spent: torch.Tensor, accept_all: bool = False) -> None:
        """Query `candidate` (the images of `rows`); keep improvements and (confirmed) successes, in place."""
        if not len(rows):
            return
        ys = y[rows]
        answer = self.ask(candidate, generator)
        spent[rows] += 1
        new = self._loss(answer, ys, spread)
        keep = torch.ones_like(new, dtype=torch.bool) if accept_all else new < loss[rows]
        current[rows[keep]] = candidate[keep]
        loss[rows[keep]] = new[keep]
        sub_spent = spent[rows]
        hit = self._confirmed(candidate, ys, self.broken(answer, ys), sub_spent, generator)
        spent[rows] = sub_spent
        best[rows[hit]] = candidate[hit]
        used[rows[hit]] = sub_spent[hit]
        done[rows[hit]] = True
