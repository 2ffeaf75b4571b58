"""Training objectives for the producer's classifiers: CE, RCE, PGD adversarial training, ALP and AT + ALP.

One training loop (`train_model`) and one loss function per objective (`LOSSES`). Every loss takes the
model in training mode, a clean batch x (B, C, H, W) in [0, 1], its labels y (B,), the adversarial batch
x_adv (B, C, H, W) for the adversarial objectives (None otherwise) and the `Objective`; it returns a
scalar tensor.

- ``ce``: cross-entropy.
- ``rce``: reverse cross-entropy (Pang et al. 2018, seed 001): cross-entropy against the reverse label
  vector R_y (0 on y, 1/(C-1) elsewhere). The model must be built with ``logit_sign=-1`` so that its
  output is the *negated* network output, the logits RCE predicts from at test time.
- ``pgd-at``: Madry et al. PGD adversarial training (seed 003 §9.1): cross-entropy on PGD examples only,
  made by the project's own `producers.attacks.pgd.PGD` (eval mode, frozen weights) inside the loop.
- ``alp``: adversarial logit pairing (Kannan et al. 2018, as seed 004 §4.3 uses it): cross-entropy on the
  mixed clean + adversarial batch plus λ · mean_i ‖Z(x_i) − Z(x_adv,i)‖²₂.
- ``at-alp``: ALP plus attention pairing (seed 004 §4.4): (β/2) Σ_j mean_i ‖Q̂_j(x_i) − Q̂_j(x_adv,i)‖₂ over
  the SmallCNN's two convolutional blocks, Q̂ the per-image L2-normalised channel-pooled |activation|^p.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..data.datasets import ImageSet
from ..errors import ProducerError

OBJECTIVES = ("ce", "rce", "pgd-at", "alp", "at-alp")
ADVERSARIAL = ("pgd-at", "alp", "at-alp")


@dataclass(frozen=True)
class Objective:
    """A training objective and its parameters (pixels in [0, 1]).

    name : one of `OBJECTIVES`.
    eps, steps, alpha : the PGD adversary of the adversarial objectives (L-inf budget, steps, step size).
    clean_weight : α, the weight of the clean cross-entropy in ALP / AT + ALP (1 − α on the adversarial one).
    logit_weight : λ, the weight of the logit-pairing term.
    attention_weight : β, the attention-pairing term is (β/2) Σ_j ‖Q̂_j(x) − Q̂_j(x_adv)‖₂.
    attention_p : the power p of |activation| in an attention map.
    """

    name: str
    eps: float = 16 / 255
    steps: int = 7
    alpha: float | None = None
    clean_weight: float = 0.5
    logit_weight: float = 0.5
    attention_weight: float = 2.0
    attention_p: float = 2.0

    @property
    def adversarial(self) -> bool:
        return self.name in ADVERSARIAL

    @property
    def step_size(self) -> float:
        """The PGD step: `alpha`, or 2.5 · eps / steps (Madry et al.'s rule) when not given."""
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    def params(self) -> dict[str, Any]:
        """JSON-ready: the name and the parameters this objective uses (for the model's config)."""
        out: dict[str, Any] = {"name": self.name}
        if self.adversarial:
            out.update(eps=self.eps, steps=self.steps, alpha=self.step_size)
        if self.name in ("alp", "at-alp"):
            out.update(clean_weight=self.clean_weight, logit_weight=self.logit_weight)
        if self.name == "at-alp":
            out.update(attention_weight=self.attention_weight, attention_p=self.attention_p)
        return out

    def model_config(self) -> dict[str, Any]:
        """Config entries the model must be built with (RCE: ``logit_sign=-1``)."""
        return {"logit_sign": -1} if self.name == "rce" else {}


def make_objective(name: str, **params: Any) -> Objective:
    """A checked `Objective`; ProducerError naming the bad option otherwise."""
    if name not in OBJECTIVES:
        raise ProducerError(f"unknown --objective {name!r}; known: {', '.join(OBJECTIVES)}")
    o = Objective(name, **{k: v for k, v in params.items() if v is not None})
    checks = [  # in order: the step size needs a valid step count
        ("at-eps", o.eps, lambda: 0 < o.eps <= 1, "in (0, 1]"),
        ("at-steps", o.steps, lambda: isinstance(o.steps, int) and o.steps >= 1, "at least 1"),
        ("at-alpha", o.alpha, lambda: 0 < o.step_size <= 1, "in (0, 1]"),
        ("clean-weight", o.clean_weight, lambda: 0 <= o.clean_weight <= 1, "in [0, 1]"),
        ("alp-lambda", o.logit_weight, lambda: 0 <= o.logit_weight < math.inf, "a finite number, at least 0"),
        ("attention-beta", o.attention_weight, lambda: 0 <= o.attention_weight < math.inf,
         "a finite number, at least 0"),
        ("attention-p", o.attention_p, lambda: 0 < o.attention_p < math.inf, "a finite positive number"),
    ]
    for option, value, ok, what in checks:
        if not ok():
            raise ProducerError(f"--{option} must be {what}, got {value}")
    return o


# -- losses -------------------------------------------------------------------------------------------

def ce_loss(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, objective: Objective) -> Tensor:
    """Cross-entropy of the clean batch."""
    return F.cross_entropy(model(x), y)


def reverse_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """RCE of raw network outputs Z (B, C): −Σ_c R_y[c] log softmax(Z)[c], averaged over the batch.

    R_y is the reverse label vector: 0 at y, 1/(C−1) on every other class (seed 001 §3.2).
    """
    num_classes = logits.shape[1]
    reverse = torch.full_like(logits, 1.0 / (num_classes - 1)).scatter_(1, y[:, None], 0.0)
    return -(reverse * F.log_softmax(logits, dim=1)).sum(1).mean()


def rce_loss(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, objective: Objective) -> Tensor:
    """RCE of the network output Z, which is minus the model's (test-time) logits."""
    if getattr(model, "logit_sign", 1) != -1:
        raise ProducerError("rce trains a model built with logit_sign=-1 (Objective.model_config()), so that "
                            "the saved model predicts from the negated logits")
    return reverse_cross_entropy(-model(x), y)


def pgd_at_loss(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, objective: Objective) -> Tensor:
    """Madry PGD adversarial training: cross-entropy of the adversarial batch only."""
    return F.cross_entropy(model(x_adv), y)


def logit_pairing(z_clean: Tensor, z_adv: Tensor) -> Tensor:
    """mean_i ‖z_clean,i − z_adv,i‖²₂ for logits (B, C)."""
    return (z_clean - z_adv).pow(2).sum(1).mean()


def _mixed_ce(z_clean: Tensor, z_adv: Tensor, y: Tensor, objective: Objective) -> Tensor:
    a = objective.clean_weight
    return a * F.cross_entropy(z_clean, y) + (1 - a) * F.cross_entropy(z_adv, y)


def alp_loss(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, objective: Objective) -> Tensor:
    """α CE(x) + (1 − α) CE(x_adv) + λ ‖Z(x) − Z(x_adv)‖² (one forward over the stacked batch)."""
    z_clean, z_adv = model(torch.cat([x, x_adv])).chunk(2)
    return _mixed_ce(z_clean, z_adv, y, objective) + objective.logit_weight * logit_pairing(z_clean, z_adv)


def attention_map(activation: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of a conv activation (B, C, H, W): Σ_c |A_c|^p, flattened to (B, H·W) and divided
    by its L2 norm per image (Zagoruyko & Komodakis's map, which seed 004 pairs)."""
    return F.normalize(activation.abs().pow(p).sum(1).flatten(1), dim=1)


def attention_pairing(a_clean: Tensor, a_adv: Tensor, p: float = 2.0) -> Tensor:
    """mean_i ‖Q̂(a_clean,i) − Q̂(a_adv,i)‖₂ for paired conv activations (B, C, H, W)."""
    return (attention_map(a_clean, p) - attention_map(a_adv, p)).norm(dim=1).mean()


def conv_block_outputs(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs end the SmallCNN's convolutional blocks (its max-pool layers)."""
    features = getattr(getattr(model, "net", model), "features", None)
    blocks = [m for m in features if isinstance(m, nn.MaxPool2d)] if isinstance(features, nn.Sequential) else []
    if not blocks:
        raise ProducerError("at-alp needs a SmallCNN (conv blocks ending in max-pooling) for its attention maps")
    return blocks


def at_alp_loss(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, objective: Objective) -> Tensor:
    """ALP plus (β/2) Σ_j mean_i ‖Q̂_j(x_i) − Q̂_j(x_adv,i)‖₂ over the conv blocks j (seed 004 §4.4)."""
    captured: list[Tensor] = []
    handles = [m.register_forward_hook(lambda module, args, out: captured.append(out))
               for m in conv_block_outputs(model)]
    try:
        z_clean, z_adv = model(torch.cat([x, x_adv])).chunk(2)
    finally:
        for h in handles:
            h.remove()
    attention = sum(attention_pairing(*a.chunk(2), p=objective.attention_p) for a in captured)
    return (_mixed_ce(z_clean, z_adv, y, objective) + objective.logit_weight * logit_pairing(z_clean, z_adv)
            + objective.attention_weight / 2 * attention)


LOSSES: dict[str, Callable[[nn.Module, Tensor, Tensor, Tensor | None, Objective], Tensor]] = {
    "ce": ce_loss, "rce": rce_loss, "pgd-at": pgd_at_loss, "alp": alp_loss, "at-alp": at_alp_loss,
}


# -- the loop -----------------------------------------------------------------------------------------

def training_subset(data: ImageSet, n: int | None, seed: int) -> ImageSet:
    """`n` images of `data` (all when None or n ≥ len): the same seeded choice `export` makes for the
    split, so an export with the same --seed and --train-samples sees exactly the training images."""
    if n is None or n >= len(data):
        return data
    if n < 1:
        raise ProducerError(f"--train-samples must be at least 1, got {n}")
    from producers.export.plan import select_samples

    idx = np.sort(select_samples(len(data), n, seed, data.split))
    return ImageSet(data.name, data.split, data.labels[idx], data.class_names, data.image_shape,
                    lambda i: data.load(idx[np.asarray(i)]))


def train_model(
    model: nn.Module,
    data: ImageSet,
    objective: Objective | str = "ce",
    *,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Train `model` with Adam on `data` under `objective`; returns it in eval mode.

    Deterministic given `seed` on the CPU: it seeds torch, the batch order and the PGD random starts.
    """
    from ..attacks.pgd import PGD

    if isinstance(objective, str):
        objective = make_objective(objective)
    torch.manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    device = torch.device(device)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = LOSSES[objective.name]
    attack = generator = None
    if objective.adversarial:
        attack = PGD(model, eps=objective.eps, alpha=objective.step_size, steps=objective.steps,
                     random_start=True, batch_size=batch_size, device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.as_tensor(data.labels)
    bar = tqdm(total=epochs * len(data), desc=f"train ({objective.name})", unit="img", disable=not progress)
    for _ in range(epochs):
        order = order_rng.permutation(len(data))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, y = data.load(idx), labels[idx]
            # The attack runs the model in eval mode with frozen weights and restores training mode.
            x_adv = attack(x, y, generator=generator).to(device) if attack is not None else None
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, x, y, x_adv, objective).backward()
            optimizer.step()
            bar.update(len(idx))
    bar.close()
    return model.eval()


def objective_record(objective: Objective, *, epochs: int, batch_size: int, lr: float, seed: int,
                     samples: int) -> dict[str, Any]:
    """The ``train`` entry of a model's config: the objective with its parameters and the loop's settings."""
    return {"objective": objective.params(), "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "seed": seed, "samples": samples}


__all__ = ["ADVERSARIAL", "LOSSES", "OBJECTIVES", "Objective", "alp_loss", "at_alp_loss", "attention_map",
           "attention_pairing", "ce_loss", "logit_pairing", "make_objective", "objective_record", "pgd_at_loss",
           "rce_loss", "reverse_cross_entropy", "train_model", "training_subset"]
