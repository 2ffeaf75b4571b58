"""The shared base of attacks that go *through* a defense (adaptive and surrogate threat models).

The attacker holds a differentiable mirror of a detect→correct pipeline (`producers.threat.mirrors`)
and the model. Every step runs the model on the current images and, when the defense reads noise
queries, on fresh noisy copies drawn from the table's own noise recipe: the attacker optimises the
expectation over the defense's randomness (EOT, ``eot`` draws per step) instead of one frozen draw.

A sample's attack *succeeds* when the pipeline's final label is wrong and not an abstention. What an
attacker may aim for depends on the pipeline (`routes_for`):

- ``model``: the bare model is wrong (no defense);
- ``corrector``: the corrector is wrong (a corrector applied to every row);
- ``evade``: the model is wrong and the detector stays below its threshold;
- ``flag``: the detector fires and the corrector is wrong (only where flagged rows are corrected);
- ``both``: model and corrector are both wrong, on the same class (flagged or not, the answer is wrong;
  under ``on_flag="agree"`` the two must agree for the row not to be rejected).

Each route is a list of objectives tried in order: a sample follows the sign of the gradient of the
first objective it does not yet meet (and of the last once it meets them all). Following one objective
at a time is scale-free, so no weight between a classification margin and a detector score has to be
tuned per detector. The latest successful iterate of every sample is kept (checked with the exact
pipeline decision on ``check_draws`` fresh noise draws), over ``restarts`` random starts.

A detector that reads more than the logits (the mirror's ``input_column``) gets it from the model and the
image at every step: ``features`` = ``model.penultimate(x)``, ``insen`` = `producers.models.insen.insen_stats`
with ``create_graph=True`` while a gradient is taken (double backpropagation: the statistics are
themselves made of an input gradient). Against ``kdensity``, the ``evade`` route is Carlini & Wagner's
white-box attack on K-density (C&W-wb in Pang et al., seed 001 §4.4) in L-inf hinge form: misclassify,
then push −log KD below the calibrated threshold (C&W-wb: below η, the median on training data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from logitguard.defenses.decision import ABSTAIN

from ..models.insen import insen_stats
from .base import Attack

ROUTES = ("model", "corrector", "evade", "flag", "both")


def routes_for(defense: nn.Module) -> tuple[str, ...]:
    """The routes that can make `defense` (a `PipelineMirror`) answer wrongly, cheapest first."""
    detector, corrector, on_flag = defense.detector, defense.corrector, defense.on_flag
    if detector is None and corrector is None:
        return ("model",)
    if detector is None:
        return ("corrector",)
    if on_flag == "reject":
        return ("evade",)
    if on_flag == "agree":
        return ("evade", "both")
    return ("evade", "flag", "both")


@dataclass
class _State:
    """What one step sees: margins are > 0 while the sample is still classified right."""

    model_margin: torch.Tensor  # (B,) f_y - max_{j != y} f_j
    corrector_margin: torch.Tensor | None  # (B,) the same on the corrector's class scores
    both_margin: torch.Tensor | None  # (B,) max of the two margins towards the model's best wrong class
    flag_excess: torch.Tensor | None  # (B,) (score - threshold) / scale: > 0 flagged


class DefenseAttack(Attack):
    """Base for L-inf attacks through a defense; subclasses choose the objectives (`_objectives`).

    Parameters
    ----------
    model : the classifier (images in [0, 1] → logits).
    defense : a `PipelineMirror` (or anything with ``detector``, ``corrector``, ``on_flag``, ``needs_noise``,
        ``forward(logits, noisy)`` and ``decide(logits, noisy)``).
    noise : the `NoiseRecipe` of the table the defense reads (needed when ``defense.needs_noise``).
    eps, alpha, steps : L-inf budget, step size (default 2.5 eps / steps) and steps per restart.
    restarts : starts per route: the clean image when 1, else uniform random points in the ball.
    eot : noise draws averaged per step (noise-reading defenses only).
    kappa : classification margin (logit units) a sample must pass before it moves on to its next
        objective. 0 measured best for evasion on the embedded data (robust 36.6% against 41.8% with 1):
        lingering to push the model deeper makes the noise reaction more conspicuous to the detector.
    score_margin : how far past the detector's threshold to aim, in units of the detector's score spread
        on the clean batch (the score is noisy; landing just under the threshold is not enough).
    check_draws : noise draws an iterate must succeed on to be kept (noise-reading defenses judge each
        exported row on a fresh draw, so an iterate that succeeds on one lucky draw often fails there).
    """

    param_names: ClassVar[tuple[str, ...]] = ("eps", "alpha", "steps", "restarts", "eot", "kappa", "score_margin",
                                              "check_draws")

    def __init__(self, model: nn.Module, *, defense: nn.Module, noise: Any = None, eps: float = 16 / 255,
                 alpha: float | None = None, steps: int = 100, restarts: int = 2, eot: int = 1,
                 kappa: float = 0.0, score_margin: float = 0.25, check_draws: int = 1, **runtime: Any):
        super().__init__(model, **runtime)
        if defense.needs_noise and noise is None:
            raise ValueError("this defense reads noise queries: pass the table's noise recipe (noise=)")
        column = getattr(defense, "input_column", None)
        if column not in (None, "features", "insen"):
            raise ValueError(f"no way to compute the defense's input column {column!r} from the model")
        if column == "features" and not callable(getattr(model, "penultimate", None)):
            raise ValueError("this defense reads penultimate features: the model needs a penultimate(x) method "
                             "(a producers.models.classifiers.ImageClassifier)")
        for name, value in (("eps", eps), ("steps", steps), ("restarts", restarts), ("eot", eot)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self.defense = defense.to(self.device).eval()
        self.noise = noise
        self.eps = float(eps)
        # Madry et al.'s rule: enough step length to cross the ball 2.5 times over the steps
        self.alpha = float(2.5 * eps / steps if alpha is None else alpha)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.eot = int(eot)
        self.kappa = float(kappa)
        self.score_margin = float(score_margin)
        self.check_draws = int(check_draws)

    # -- the defense, seen through the model -------------------------------------------------------

    def _forward(self, x: torch.Tensor, generator: torch.Generator | None, draws: int = 1):
        """The mirror's inputs (logits, noise queries or None, input-column rows or None) on `draws` noise
        draws of every image: each tensor has `draws * B` rows."""
        logits = self.model(x)
        features = self._column(x)
        noisy = None
        if self.defense.needs_noise:
            reps = x.repeat(draws, *([1] * (x.ndim - 1)))
            eta = self.noise.sample(reps.shape, generator, x.device)  # (draws*B, K, *image)
            k = eta.shape[1]
            noisy_images = (reps.unsqueeze(1) + eta).clamp_(0.0, 1.0).flatten(0, 1)
            noisy = self.model(noisy_images).view(len(reps), k, -1)
        logits = logits.repeat(draws, 1)
        return logits, noisy, None if features is None else features.repeat(draws, 1)

    def _column(self, x: torch.Tensor) -> torch.Tensor | None:
        """The rows (B, F) of the column the defense's detector reads besides the logits, from the model and x;
        differentiable in x whenever a gradient is being taken."""
        column = getattr(self.defense, "input_column", None)
        if column is None:
            return None
        if column == "features":
            features = self.model.penultimate(x)
            if features is None:
                raise ValueError("the model has no final linear layer to take penultimate features from")
            return features
        return insen_stats(self.model, x, create_graph=torch.is_grad_enabled())

    @torch.no_grad()
    def decide(self, x: torch.Tensor, generator: torch.Generator | None, draws: int = 1) -> torch.Tensor:
        """The pipeline's exact final labels (draws, B), -1 = abstain, each draw with fresh noise."""
        return self.defense.decide(*self._forward(x, generator, draws)).view(draws, len(x))

    def succeeded(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None,
                  draws: int = 1) -> torch.Tensor:
        """(B,) bool: the final label is wrong and not an abstention on every one of `draws` draws."""
        final = self.decide(x, generator, draws)
        return ((final != y) & (final != ABSTAIN)).all(dim=0)

    def _state(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None,
               target: torch.Tensor | None = None) -> _State:
        """Margins and flag excess on `x`, averaged over `eot` draws (differentiable); the margins towards
        `target` (B,) when given, else towards each score's best wrong class."""
        out = self.defense(*self._forward(x, generator, self.eot))
        b = len(x)
        yy = y.repeat(self.eot)
        tt = None if target is None else target.repeat(self.eot)
        model_margin = _margin(out.logits, yy, tt)
        corrector_margin = both = excess = None
        if out.corrected is not None:
            corrector_margin = _margin(out.corrected, yy, tt)
            # towards the model's best wrong class, so that model and corrector agree on one wrong answer
            common = _best_other(out.logits, yy) if tt is None else tt
            both = torch.maximum(_margin(out.logits, yy, common), _margin(out.corrected, yy, common))
        if out.score is not None:
            excess = (out.score - out.threshold) / self._score_scale
        mean = lambda t: None if t is None else t.view(self.eot, b).mean(dim=0)  # noqa: E731
        return _State(mean(model_margin), mean(corrector_margin), mean(both), mean(excess))

    # -- the optimisation --------------------------------------------------------------------------

    def _objectives(self, route: str, s: _State) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(loss (B,), met (B,) bool) pairs to meet in order for `route`; losses are minimised."""
        k, m = self.kappa, self.score_margin
        if route == "model":
            return [(s.model_margin, s.model_margin < -k)]
        if route == "corrector":
            return [(s.corrector_margin, s.corrector_margin < -k)]
        if route == "evade":
            return [(s.model_margin, s.model_margin < -k), (s.flag_excess, s.flag_excess < -m)]
        if route == "flag":
            return [(-s.flag_excess, s.flag_excess > m), (s.corrector_margin, s.corrector_margin < -k)]
        if route == "both":
            return [(s.both_margin, s.both_margin < -k)]
        raise ValueError(f"unknown route {route!r}; known: {ROUTES}")

    def _loss(self, route: str, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per-sample loss (B,): the first unmet objective's, or the last one's once all are met."""
        objectives = self._objectives(route, self._state(x, y, generator))
        loss = objectives[-1][0]
        for value, met in reversed(objectives[:-1]):
            loss = torch.where(met, loss, value)
        return loss

    def _run_route(self, route: str, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None,
                   best: torch.Tensor, found: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        """PGD on `route` (or on ``loss_fn(images, labels) -> (B,)``) over the restarts, for the samples
        not yet `found`; writes their successes into `best` / `found` in place."""
        loss_fn = loss_fn or (lambda z, labels: self._loss(route, z, labels, generator))
        for restart in range(self.restarts):
            rows = (~found).nonzero()[:, 0]
            if not len(rows):
                return
            xs, ys = x[rows], y[rows]
            lower, upper = (xs - self.eps).clamp(min=0.0), (xs + self.eps).clamp(max=1.0)
            x_adv = xs.clone()
            if self.restarts > 1:
                noise = torch.rand(xs.shape, generator=generator, device=x.device, dtype=x.dtype)
                x_adv = torch.min(torch.max(xs + self.eps * (2 * noise - 1), lower), upper)
            sub_best, sub_found = best[rows], found[rows]
            self._active_rows = rows  # which samples of the batch this run attacks (for per-sample state)
            self._begin_run(len(rows))
            tracker = _StallTracker(self.steps)
            for step in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                grad, loss = self._step_direction(route, loss_fn, x_adv, ys, generator)
                with torch.no_grad():
                    tracker.update(step, loss)
                    x_adv = torch.min(torch.max(x_adv - self.alpha * grad.sign(), lower), upper)
                    # the latest success: later iterates sit further past the margins
                    hit = self.succeeded(x_adv, ys, generator, self.check_draws)
                    sub_best[hit] = x_adv[hit]
                    sub_found |= hit
            self._end_run(sub_best, sub_found)
            best[rows], found[rows] = sub_best, sub_found
            self.stalled[rows] = tracker.stalled() & ~sub_found

    def _begin_run(self, n: int) -> None:
        """Hook: a PGD run on `n` samples (``self._active_rows`` of the batch) starts."""

    def _end_run(self, best: torch.Tensor, found: torch.Tensor) -> None:
        """Hook: the run ends; `best` / `found` (its samples') may still be changed in place."""

    def _step_direction(self, route: str, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        x_adv: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(descent direction like x_adv, per-sample loss (B,) detached) at `x_adv`; PGD steps against its sign."""
        loss = loss_fn(x_adv, y)
        return self.input_gradient(loss.sum(), x_adv), loss.detach()

    def _score_scale_on(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Spread of the detector's score on the clean batch (a unit for `score_margin`), at least 1e-6."""
        if self.defense.detector is None:
            return torch.ones((), device=x.device)
        with torch.no_grad():
            score = self.defense(*self._forward(x, generator)).score
        spread = score.std() if len(score) > 1 else score.abs().mean()
        return spread.clamp(min=1e-6).detach()

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Adversarial batch within `eps` of `x`: each sample's latest successful iterate, else `x` itself
        (an attack that found nothing submits the clean image)."""
        self._score_scale = self._score_scale_on(x, generator)
        # (B,) unbroken samples whose loss stopped improving in the first half of their last run (an
        # attack-failure indicator, Pintor et al. 2022)
        self.stalled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        best, found = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        with torch.no_grad():
            found |= self.succeeded(x, y, generator)  # already wrong: nothing to do
        self._attack(x, y, generator, best, found)
        return best

    def _attack(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None,
                best: torch.Tensor, found: torch.Tensor) -> None:
        """Fill `best` / `found`: every route of `routes` in turn, each on the samples still unbroken."""
        for route in self.routes():
            self._run_route(route, x, y, generator, best, found)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "routes": list(self.routes()), "on_flag": self.defense.on_flag}

    def routes(self) -> Sequence[str]:
        return routes_for(self.defense)


def top_wrong_classes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The `k` highest-scoring wrong classes of the clean model on `x`, best first: k tensors (B,) (fewer when
    the model has fewer wrong classes); the targets of a targeted attack's successive runs."""
    with torch.no_grad():
        logits = model(x).float().scatter(1, y[:, None], -math.inf)
    k = min(k, logits.shape[1] - 1)
    return list(logits.argsort(dim=1, descending=True)[:, :k].T)


def _margin(scores: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """s_y − s_target (B,), target defaulting to the best class other than y: > 0 while y still wins."""
    true = scores.gather(1, y[:, None])[:, 0]
    other = scores.gather(1, _best_other(scores, y)[:, None])[:, 0] if target is None else \
        scores.gather(1, target[:, None])[:, 0]
    return true - other


def _best_other(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The highest-scoring class other than y (B,)."""
    masked = scores.detach().scatter(1, y[:, None], float("-inf"))
    return masked.argmax(dim=1)


class _StallTracker:
    """Best loss after the first half of a run and at its end: a loss that stopped improving early."""

    def __init__(self, steps: int) -> None:
        self.steps, self.half = steps, max(steps // 2, 1)
        self.best = self.at_half = None

    def update(self, step: int, loss: torch.Tensor) -> None:
        loss = loss.detach().float().flatten()
        self.best = loss if self.best is None else torch.minimum(self.best, loss)
        if step == self.half - 1:
            self.at_half = self.best.clone()

    def stalled(self) -> torch.Tensor:
        """(B,) bool: the best loss did not improve after the first half (all False for runs under 2 steps)."""
        if self.steps < 2 or self.at_half is None:
            return torch.zeros(0 if self.best is None else len(self.best), dtype=torch.bool,
                               device=None if self.best is None else self.best.device)
        return self.best >= self.at_half - 1e-6 * self.at_half.abs()
