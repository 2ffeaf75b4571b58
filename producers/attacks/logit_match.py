"""Logit matching with EOT (Tramèr, Carlini, Brendel & Madry, NeurIPS 2020, §5.x on the odds test).

A detector that reads how the logits react to noise learns what *natural* images of a class look like
under noise. This attack makes the adversarial image look like a natural image of another class, clean and
noisy alike: for each sample it picks a target image x_t from the same batch (another true label, which
the pipeline answers right and does not flag, nearest in L2 pixel distance) and minimises

    ||f(x') − f(x_t)||² + mean_{η, k} ||f(x' + η_k) − mean_{η'} f(x_t + η'_k)||²

over ``eot`` noise draws per step on the attacked side (the target's noisy logits are averaged over
``eot`` draws once, per noise query k). Samples without an eligible target are left alone. Where the
defense reads no noise, only the first term remains.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .defended import DefenseAttack


class LogitMatch(DefenseAttack):
    """Match a natural target's clean and noisy logits (see module)."""

    name: ClassVar[str] = "logit-match"

    def routes(self):
        return ("match",)

    @torch.no_grad()
    def _targets(self, x, y, generator):
        """Target index per sample (B,) into the batch, -1 where none is eligible."""
        logits, noisy, features = self._forward(x, generator, self.check_draws)
        final = self.defense.decide(logits, noisy, features).view(self.check_draws, len(x))
        flagged = self.defense.flagged(logits, noisy, features).view(self.check_draws, len(x))
        if self.defense.detector is None:
            flagged = torch.zeros_like(flagged)
        natural = ((final == y) & ~flagged).all(dim=0)
        dist = torch.cdist(x.flatten(1), x.flatten(1))
        dist = dist.masked_fill((y[:, None] == y[None, :]) | ~natural[None, :], float("inf"))
        nearest = dist.argmin(dim=1)
        return torch.where(dist.gather(1, nearest[:, None])[:, 0].isfinite(), nearest, -1)

    @torch.no_grad()
    def _target_logits(self, xt, generator):
        """Clean logits (T, C) and per-query noisy logits averaged over `eot` draws (T, K, C) or None."""
        clean = self.model(xt).double()
        if not self.defense.needs_noise:
            return clean, None
        _, noisy, _ = self._forward(xt, generator, self.eot)
        return clean, noisy.double().view(self.eot, len(xt), *noisy.shape[1:]).mean(dim=0)

    def _attack(self, x, y, generator, best, found) -> None:
        target = self._targets(x, y, generator)
        clean_t, noisy_t = self._target_logits(x[target.clamp(min=0)], generator)

        def loss_fn(z, labels):
            rows = self._active_rows
            logits, noisy, _ = self._forward(z, generator, self.eot)
            loss = (logits[:len(z)].double() - clean_t[rows]).square().sum(dim=1)
            if noisy is not None:
                noisy = noisy.double().view(self.eot, len(z), *noisy.shape[1:])
                loss = loss + (noisy - noisy_t[rows]).square().sum(dim=-1).mean(dim=(0, 2))
            return loss

        skip = (target < 0) & ~found
        done = found | skip
        self._run_route("match", x, y, generator, best, done, loss_fn=loss_fn)
        found |= done & ~skip
