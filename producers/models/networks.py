"""The producer's network modules: the small CNN, the JumpReLU activation and `ImageClassifier`.

Every model takes pixels in [0, 1]; `ImageClassifier` wraps a network with the dataset's normalisation
(`Normalize`) so attacks work in pixel space, and exposes its penultimate layer. Building, resolving,
saving and loading them is `producers.models.classifiers`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ProducerError


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers so they travel with the weights."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


JUMPRELU_DEFAULT_K = 0.0645  # seed 003 §9.4: the jump its author chose by trial and error


class JumpReLU(nn.Module):
    """JumpReLU (Erichson et al. 2019, seed 003 §9.4): f(z) = z where z > k, else 0.

    A retrofit defense: in training mode it is a plain ReLU (the network learns as usual) and the jump
    applies only in eval mode, i.e. whenever the model is attacked or exported. With ``random=True``
    each eval forward draws its own jump k' ~ U(0, 2k) (mean k) from torch's global generator, so
    ``torch.manual_seed`` makes a run reproducible.
    """

    def __init__(self, k: float = JUMPRELU_DEFAULT_K, random: bool = False):
        super().__init__()
        self.k = float(k)
        self.random = bool(random)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.relu(z)
        k = 2.0 * self.k * float(torch.rand(())) if self.random else self.k
        return z * (z > k)

    def extra_repr(self) -> str:
        return f"k={self.k}" + (", random=True" if self.random else "")


def parse_activation(spec: str) -> dict[str, Any]:
    """``relu`` | ``jumprelu[:k][:random]`` → the JSON config entry, e.g. ``{"name": "jumprelu",
    "k": 0.0645, "random": False}``; ProducerError for anything else."""
    name, *rest = spec.strip().split(":")
    usage = "--activation takes relu or jumprelu[:k][:random] (e.g. jumprelu:0.0645:random)"
    if name == "relu" and not rest:
        return {"name": "relu"}
    if name != "jumprelu" or len(rest) > 2:
        raise ProducerError(f"{usage}, got {spec!r}")
    random = bool(rest) and rest[-1] == "random"
    if random:
        rest = rest[:-1]
    if len(rest) > 1:
        raise ProducerError(f"{usage}, got {spec!r}")
    if not rest:
        return {"name": "jumprelu", "k": JUMPRELU_DEFAULT_K, "random": random}
    try:
        k = float(rest[0])
    except ValueError:
        raise ProducerError(f"{usage}: the jump k must be a number, got {rest[0]!r}") from None
    if not (math.isfinite(k) and k > 0):
        raise ProducerError(f"{usage}: the jump k must be a positive finite number, got {rest[0]!r}")
    return {"name": "jumprelu", "k": k, "random": random}


def _activation(config: Mapping[str, Any] | None) -> nn.Module:
    """The activation module a config entry (see `parse_activation`; None: ReLU) describes."""
    if config is None or config.get("name") == "relu":
        return nn.ReLU()
    if config.get("name") == "jumprelu":
        k = config.get("k", JUMPRELU_DEFAULT_K)
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
            raise ProducerError(f"jumprelu needs a positive jump k, got {k!r}")
        return JumpReLU(k, bool(config.get("random", False)))
    raise ProducerError(f"unknown activation {config!r}; known: relu, jumprelu")


class SmallCNN(nn.Module):
    """conv(w)-pool-conv(2w)-pool-fc128-fc(C). With w=32, about 91% on Fashion-MNIST after a few CPU
    epochs, at ~8.5 MFLOPs per 28x28 image: cheap enough to attack tens of thousands of images on 2 cores.

    `activation` (a `parse_activation` entry) replaces every ReLU, e.g. by `JumpReLU`; it has no weights,
    so the state dict is the same whatever the activation.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 32,
                 activation: Mapping[str, Any] | None = None):
        super().__init__()
        h, w = image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), _activation(activation), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), _activation(activation), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (h // 4) * (w // 4), 128), _activation(activation),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ImageClassifier(nn.Module):
    """Normalisation + network: maps images (N, C, H, W) in [0, 1] to logits (N, num_classes).

    `config` is the JSON-ready description `load_model` rebuilds it from. ``config["logit_sign"] == -1``
    (an RCE-trained network, seed 001) makes `forward` return the negated network output, the logits RCE
    predicts from at test time, so attacks and exports see an ordinary classifier.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], config: dict[str, Any]):
        super().__init__()
        sign = config.get("logit_sign", 1)
        if sign not in (1, -1):
            raise ProducerError(f"logit_sign must be 1 or -1, got {sign!r}")
        self.normalize = Normalize(mean, std)
        self.net = net
        self.logit_sign = int(sign)
        self.config = dict(config, mean=list(mean), std=list(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.normalize(x))
        return -logits if self.logit_sign < 0 else logits

    def penultimate(self, x: torch.Tensor) -> torch.Tensor | None:
        """Penultimate-layer features (N, F): the input of the final linear layer; None without one."""
        head = _final_linear(self.net)
        if head is None:
            return None
        captured: list[torch.Tensor] = []
        # A hook, because the zoo networks' `features` are conv maps, not the classifier's input.
        handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.net(self.normalize(x))
        finally:
            handle.remove()
        return captured[0].flatten(1)


def _final_linear(net: nn.Module) -> nn.Linear | None:
    """The layer producing the logits: SmallCNN ``head``, ResNet ``fc``, DenseNet/VGG ``classifier``."""
    for name in ("head", "fc", "classifier"):
        module = getattr(net, name, None)
        if isinstance(module, nn.Sequential):
            module = module[-1]
        if isinstance(module, nn.Linear):
            return module
    return None
