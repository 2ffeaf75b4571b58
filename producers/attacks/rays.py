"""RayS (Chen & Gu, KDD 2020): a decision-based L-inf attack that sees only the final label.

Why RayS and not HopSkipJump: the budget is L-inf, and RayS searches L-inf directly. It looks for the sign
direction d ∈ {−1, +1}^D whose ray x + r·d reaches a wrong label at the smallest radius r (the L-inf distance):
it flips the signs of d block by block, halving the block size after each sweep, and keeps a flip when the
new ray is already adversarial at the best radius so far (one query), then binary-searches its radius. No
gradient estimate, no step size or geometric schedule to tune, and every query is a plain label query;
HopSkipJump's L-inf variant estimates gradients from hundreds of queries per step and was built for L2.
RayS is reported as stronger than HopSkipJump in L-inf at the same query budgets (Chen & Gu, Table 2-4).

Against a pipeline (`QueryAttack`, ``returns="labels"``), "adversarial" is a wrong label that is not an
abstention; the answer is random where the defender draws noise per query, which the attack takes as it
comes. A sample stops as soon as a query at radius ≤ eps returns a wrong label (confirmed by ``confirm`` more
answers where the pipeline draws noise, `QueryAttack`); that image is submitted.
The first radius of a sample is found by a line search of ``line_steps`` radii up to 1 (the paper's 0.01 grid
when 100), repeated for each new direction until some ray works.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from .query import QueryAttack


class RayS(QueryAttack):
    """Decision-based L-inf RayS through a pipeline's service (see module).

    Parameters: `QueryAttack`'s (``eps``, ``queries``), ``line_steps`` (radii of the first line search) and
    ``tolerance`` (binary-search width at which a radius is settled).
    """

    name = "rays"
    returns: ClassVar[str] = "labels"
    param_names: ClassVar[tuple[str, ...]] = ("eps", "queries", "confirm", "line_steps", "tolerance")

    def __init__(self, model: nn.Module, *, line_steps: int = 100, tolerance: float = 1e-3, **kwargs: Any):
        super().__init__(model, **kwargs)
        if not (isinstance(line_steps, int) and line_steps >= 1):
            raise ValueError(f"line_steps must be an integer >= 1, got {line_steps!r}")
        if not tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
        self.line_steps, self.tolerance = int(line_steps), float(tolerance)

    def _search(self, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(x)
        dim = x[0].numel()
        dev = x.device
        _, done, used, spent = self._first(x, y, generator)
        best = x.clone()
        direction = torch.ones(b, dim, dtype=x.dtype, device=dev)
        radius = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
        state = (x, y, generator, spent, done, used, best, direction, radius)
        self._try(torch.arange(b, device=dev)[~done], direction[~done], state)
        stage, block = 0, 0
        while True:
            rows = (~done & (spent < self.queries)).nonzero()[:, 0]
            if not len(rows):
                break
            size = math.ceil(dim / 2 ** stage)
            candidate = direction[rows].clone()
            candidate[:, block * size:(block + 1) * size] *= -1
            self._try(rows, candidate, state)
            block += 1
            if block * size >= dim:
                stage, block = (stage + 1, 0) if size > 1 else (0, 0)
        return best, used

    def _try(self, rows: torch.Tensor, candidate: torch.Tensor, state: tuple) -> None:
        """One direction per row of `rows`: keep it when its ray is adversarial at a radius below the row's best
        (then binary-search that radius), all in place on `state`."""
        x, y, generator, spent, done, used, best, direction, radius = state
        lo = torch.zeros(len(rows), dtype=torch.float64, device=x.device)
        hi = radius[rows].clone()  # adversarial at hi once found; inf = nothing yet
        known = torch.isfinite(hi)
        found = torch.zeros_like(known)
        # rows with a radius: is the new ray adversarial there already? (one query)
        sel = (known & self._left(rows, done, spent)).nonzero()[:, 0]
        if len(sel):
            found[sel] = self._query(rows, sel, candidate, hi, state)
        # rows without one: line search up to 1
        for k in range(1, self.line_steps + 1):
            sel = (~known & ~found & self._left(rows, done, spent)).nonzero()[:, 0]
            if not len(sel):
                break
            hi[sel] = k / self.line_steps
            found[sel] = self._query(rows, sel, candidate, hi, state)
        hi = torch.where(found, hi, radius[rows])
        # binary search between the last radius that failed and the one that worked
        while True:
            sel = (found & (hi - lo > self.tolerance) & self._left(rows, done, spent)).nonzero()[:, 0]
            if not len(sel):
                break
            mid = (lo + hi) / 2
            hit = self._query(rows, sel, candidate, mid, state)
            hi[sel[hit]], lo[sel[~hit]] = mid[sel[hit]], mid[sel[~hit]]
        keep = found & (hi < radius[rows])
        direction[rows[keep]] = candidate[keep]
        radius[rows[keep]] = hi[keep]

    def _left(self, rows: torch.Tensor, done: torch.Tensor, spent: torch.Tensor) -> torch.Tensor:
        """(len(rows),) bool: still unbroken with queries left."""
        return ~done[rows] & (spent[rows] < self.queries)

    def _query(self, rows: torch.Tensor, sel: torch.Tensor, candidate: torch.Tensor, r: torch.Tensor,
               state: tuple) -> torch.Tensor:
        """Ask the service about x + r·d for the entries `sel` of `rows`; (len(sel),) bool adversarial. A wrong
        answer at r ≤ eps breaks the sample: its image is kept and it stops."""
        x, y, generator, spent, done, used, best, _, _ = state
        idx = rows[sel]
        xs = x[idx]
        radius = r[sel].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        images = (xs + radius * candidate[sel].view_as(xs)).clamp(0.0, 1.0)
        hit = self.broken(self.ask(images, generator), y[idx])
        spent[idx] += 1
        win = hit & (r[sel] <= self.eps + 1e-9)
        if win.any():
            sub_spent = spent[idx]
            win = self._confirmed(images, y[idx], win, sub_spent, generator)
            spent[idx] = sub_spent
            images = torch.min(torch.max(images, xs - self.eps), xs + self.eps)  # float rounding only
            best[idx[win]] = images[win]
            used[idx[win]] = spent[idx[win]]
            done[idx[win]] = True
        return hit
