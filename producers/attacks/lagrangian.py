"""Joint hinge / Lagrangian attack: misclassify while the detector stays under its threshold by a margin.

    loss = max(margin + kappa, 0) + λ · max(flag_excess + score_margin, 0)

(margin: the model's classification margin, > 0 while right; flag_excess: (score − threshold) / spread,
> 0 when flagged). Each sample has its own multiplier λ, adapted every ``update_every`` steps: doubled while
the sample is still flagged (by the margin), divided by 1.5 when it is not, clipped to [``lambda_min``,
``lambda_max``] — the dual ascent of the constrained problem "misclassify subject to not being flagged",
so no single weight between the two terms has to fit every sample. Without a detector: PGD on the hinge
of the model's margin (the corrector's where a corrector answers every row).

``targets`` > 0: the margin is taken towards one class t (s_y − s_t) instead of the best wrong one, once for
each of the ``targets`` highest wrong classes of the clean model, on the samples still unbroken (as APGD-T
does). A sample whose nearest wrong class lies where the detector fires may still be fooled, unflagged,
towards its second or third.

``fallback``: a sample the attack never saw succeed on a check draw is submitted, instead of the clean image,
at the iterate that fooled the model with the lowest detector excess (mean over the step's EOT draws). Against
a randomised detector judged on fresh draws, such a near miss may still get through on one of them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from .defended import DefenseAttack, top_wrong_classes


class Lagrangian(DefenseAttack):
    """Hinge Lagrangian with a per-sample adapted multiplier (see module)."""

    name: ClassVar[str] = "lagrangian"
    param_names: ClassVar[tuple[str, ...]] = DefenseAttack.param_names + (
        "lambda_init", "lambda_min", "lambda_max", "update_every", "targets", "fallback")

    def __init__(self, model: nn.Module, *, lambda_init: float = 1.0, lambda_min: float = 0.01,
                 lambda_max: float = 100.0, update_every: int = 5, targets: int = 0, fallback: bool = False,
                 **kwargs: Any):
        super().__init__(model, **kwargs)
        if not 0 < lambda_min <= lambda_init <= lambda_max or update_every < 1:
            raise ValueError("need 0 < lambda_min <= lambda_init <= lambda_max and update_every >= 1")
        if targets < 0:
            raise ValueError(f"targets must be >= 0, got {targets!r}")
        self.targets, self.fallback = int(targets), bool(fallback)
        self._target: torch.Tensor | None = None  # (B,) the class the current runs aim for, None: any
        self.lambda_init, self.lambda_min, self.lambda_max = float(lambda_init), float(lambda_min), float(lambda_max)
        self.update_every = int(update_every)

    def routes(self):
        return ("lagrangian",)

    def _attack(self, x, y, generator, best, found) -> None:
        # the lowest excess seen so far on an iterate that fooled the model, per sample of the batch
        self._near = torch.full((len(x),), math.inf, dtype=torch.float64, device=x.device)
        if not self.targets:
            return super()._attack(x, y, generator, best, found)
        try:
            for self._target in top_wrong_classes(self.model, x, y, self.targets):
                super()._attack(x, y, generator, best, found)
        finally:
            self._target = None

    def _begin_run(self, n: int) -> None:
        self._lam = torch.full((n,), self.lambda_init, dtype=torch.float64, device=self.device)
        self._step = 0
        self._near_x = self._near_here = None  # this run's near misses (`fallback`) and which samples have one

    def _keep_near_miss(self, x_adv: torch.Tensor, s) -> None:
        """Remember each sample's iterate that fooled the model with the lowest excess so far (`fallback`)."""
        if s.flag_excess is None:
            return
        rows = self._active_rows
        excess = s.flag_excess.detach().double()
        closer = (s.model_margin.detach() < 0) & (excess < self._near[rows])
        if closer.any():
            if self._near_x is None:
                self._near_x = torch.empty_like(x_adv).detach()
                self._near_here = torch.zeros_like(closer)
            self._near_x[closer] = x_adv.detach()[closer]
            self._near_here |= closer
            self._near[rows[closer]] = excess[closer]

    def _end_run(self, best: torch.Tensor, found: torch.Tensor) -> None:
        if self._near_x is not None:
            near = ~found & self._near_here
            best[near] = self._near_x[near]

    def _step_direction(self, route, loss_fn, x_adv, y, generator):
        target = None if self._target is None else self._target[self._active_rows]
        s = self._state(x_adv, y, generator, target)
        if self.fallback:
            self._keep_near_miss(x_adv, s)
        margin = s.model_margin if s.corrector_margin is None or s.flag_excess is not None else s.corrector_margin
        loss = (margin + self.kappa).clamp(min=0).double()
        if s.flag_excess is not None:
            over = s.flag_excess.double() + self.score_margin
            loss = loss + self._lam * over.clamp(min=0)
            self._step += 1
            if self._step % self.update_every == 0:
                flagged = over.detach() > 0
                self._lam = torch.where(flagged, self._lam * 2, self._lam / 1.5).clamp(self.lambda_min,
                                                                                       self.lambda_max)
        return self.input_gradient(loss.sum(), x_adv), loss.detach()
