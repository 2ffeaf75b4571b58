"""PGD on the defended output: the pipeline's chance of answering wrongly, made differentiable.

The detector's hard threshold becomes a sigmoid of its score (temperature ``temperature`` in units of
the score's spread on the clean batch), so one loss covers every pipeline and policy:

    P(wrong) = (1 − s)·(1 − p_f[y]) + s·Q        s = sigmoid((score − threshold) / T)

with ``Q = 1 − p_c[y]`` when flagged rows are corrected, ``Q = 0`` when they are rejected, and
``Q = Σ_{j≠y} p_f[j]·p_c[j]`` when they are kept only if the corrector agrees (p_f, p_c: softmax of
the model's and the corrector's class scores). ``loss="ce"`` minimises −log P(wrong), the
cross-entropy towards a wrong answer (unlike log(1 − P(wrong)), its gradient does not vanish while the
detector's sigmoid is saturated); ``loss="margin"`` minimises logit(1 − P(wrong)), clamped at −kappa so
finished samples stop pulling.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .defended import DefenseAttack

_TINY = 1e-12


class DefendedPGD(DefenseAttack):
    """L-inf PGD that maximises the defended pipeline's soft error probability (see module)."""

    name: ClassVar[str] = "defended-pgd"
    param_names: ClassVar[tuple[str, ...]] = DefenseAttack.param_names + ("loss", "temperature")

    def __init__(self, model: nn.Module, *, loss: str = "ce", temperature: float = 1.0, kappa: float = 1.0,
                 **kwargs: Any):
        super().__init__(model, kappa=kappa, **kwargs)
        if loss not in ("ce", "margin"):
            raise ValueError(f"loss must be 'ce' or 'margin', got {loss!r}")
        self.loss = loss
        self.temperature = float(temperature)

    def wrong_probability(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """P(the pipeline answers wrongly) (B,), averaged over `eot` noise draws (differentiable)."""
        out = self.defense(*self._forward(x, generator, self.eot))
        yy = y.repeat(self.eot)
        p_model = F.softmax(out.logits.float(), dim=1)
        model_wrong = 1.0 - p_model.gather(1, yy[:, None])[:, 0]
        if out.corrected is None:
            wrong = model_wrong
        else:
            p_corr = F.softmax(out.corrected.float(), dim=1)
            on_flag = self.defense.on_flag if out.score is not None else "correct"
            if on_flag == "correct":
                flagged_wrong = 1.0 - p_corr.gather(1, yy[:, None])[:, 0]
            elif on_flag == "reject":
                flagged_wrong = torch.zeros_like(model_wrong)
            else:  # agree: the model's and the corrector's answers coincide on a wrong class
                agree = p_model * p_corr
                flagged_wrong = agree.sum(dim=1) - agree.gather(1, yy[:, None])[:, 0]
            if out.score is None:  # a corrector applied to every row
                wrong = flagged_wrong
            else:
                s = torch.sigmoid((out.score - out.threshold).float() / (self._score_scale * self.temperature))
                wrong = (1.0 - s) * model_wrong + s * flagged_wrong
        return wrong.view(self.eot, len(x)).mean(dim=0)

    def _defended_loss(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        wrong = self.wrong_probability(x, y, generator).clamp(_TINY, 1.0)
        if self.loss == "ce":
            return -wrong.log()
        logit = (1.0 - wrong).clamp(min=_TINY).log() - wrong.log()
        return logit.clamp(min=-self.kappa)

    def _attack(self, x, y, generator, best, found) -> None:
        self._run_route("defended", x, y, generator, best, found,
                        loss_fn=lambda z, labels: self._defended_loss(z, labels, generator))

    def routes(self):
        return ("defended",)
