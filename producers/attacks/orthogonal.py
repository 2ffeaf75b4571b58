"""Orthogonal and Selective PGD (Bryniarski, Hingun, Pachuca, Wang & Carlini, ICLR 2022).

Against a detector-gated classifier, summing the classification loss and the detector's score lets one
term's gradient drown the other. Instead, every sample at every step follows one of the two:

- while the model still answers right (margin > −kappa): the classification margin's gradient;
- once it is wrong: the detector score's gradient (downwards, towards ``score_margin`` spreads under
  the threshold).

``orthogonal-pgd`` first projects the followed gradient orthogonally to the other one, so a step that
fixes one term does not undo the other; ``selective-pgd`` follows it unprojected. Both take signed L-inf
steps of ``alpha`` and keep the latest success per sample (as `DefenseAttack`). Without a detector there is
nothing to select between: both are PGD on the margin (the model's, or the corrector's when one answers
every row).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .defended import DefenseAttack


class OrthogonalPGD(DefenseAttack):
    """Per-sample selection between classification and detector gradients, projected (see module)."""

    name: ClassVar[str] = "orthogonal-pgd"
    project: ClassVar[bool] = True

    def routes(self):
        return ("evade",) if self.defense.detector is not None else super().routes()

    def _step_direction(self, route, loss_fn, x_adv, y, generator):
        if route != "evade":
            return super()._step_direction(route, loss_fn, x_adv, y, generator)
        s = self._state(x_adv, y, generator)
        g_class = self.input_gradient(s.model_margin.sum(), x_adv, retain_graph=True).flatten(1)
        g_detect = self.input_gradient(s.flag_excess.sum(), x_adv).flatten(1)
        right = (s.model_margin > -self.kappa).detach()
        follow = torch.where(right[:, None], g_class, g_detect)
        if self.project:
            other = torch.where(right[:, None], g_detect, g_class)
            dot = (follow * other).sum(dim=1, keepdim=True)
            follow = follow - dot / other.square().sum(dim=1, keepdim=True).clamp(min=1e-30) * other
        loss = torch.where(right, s.model_margin, s.flag_excess.to(s.model_margin.dtype)).detach()
        return follow.view_as(x_adv), loss


class SelectivePGD(OrthogonalPGD):
    """The same selection without the projection."""

    name: ClassVar[str] = "selective-pgd"
    project: ClassVar[bool] = False
