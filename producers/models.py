"""Classifiers for the producer: a small CNN it trains itself, saved without pickle.

Every model takes pixels in [0, 1]; `ImageClassifier` puts the dataset's normalisation inside the
model so attacks work in pixel space. A saved model is two files: ``NAME.pt`` (a state dict, read
with ``torch.load(weights_only=True)``) and ``NAME.json`` (the config needed to rebuild it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from logitguard._io import atomic_output, refuse_overwrite

from .datasets import ImageSet
from .errors import ProducerError


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers so they travel with the weights."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """conv32-conv64-pool-conv64-pool-fc128-fc(C): ~90%+ on Fashion-MNIST after a few CPU epochs."""

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 32):
        super().__init__()
        h, w = image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (h // 4) * (w // 4), 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ImageClassifier(nn.Module):
    """Normalisation + network: maps images (N, C, H, W) in [0, 1] to logits (N, num_classes).

    `config` is the JSON-ready description `load_model` rebuilds it from.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], config: dict[str, Any]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.config = dict(config, mean=list(mean), std=list(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor | None:
        """Penultimate-layer features (N, F) when the network exposes them, else None."""
        features = getattr(self.net, "features", None)
        return None if features is None else features(self.normalize(x))


def build_model(config: dict[str, Any]) -> ImageClassifier:
    """An untrained model from a config (``arch`` plus its arguments, ``mean``, ``std``)."""
    arch = config.get("arch")
    if arch == "small-cnn":
        net = SmallCNN(config["in_channels"], config["num_classes"], tuple(config["image_size"]),
                       config.get("width", 32))
    else:
        raise ProducerError(f"unknown model architecture {arch!r}; known: ['small-cnn']")
    return ImageClassifier(net, config["mean"], config["std"], config)


def small_cnn_for(data: ImageSet, **extra: Any) -> ImageClassifier:
    """A SmallCNN shaped for `data`, normalised with its per-channel pixel mean and std."""
    images = data.all_images()
    mean = images.mean(dim=(0, 2, 3)).tolist()
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    channels, h, w = data.image_shape
    config = {"arch": "small-cnn", "in_channels": channels, "num_classes": data.num_classes,
              "image_size": [h, w], "class_names": data.class_names, "dataset": data.name, **extra}
    return build_model({**config, "mean": mean, "std": std})


def train_classifier(
    model: nn.Module,
    data: ImageSet,
    *,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Train `model` with Adam and cross-entropy on `data`; deterministic given `seed` on the CPU."""
    torch.manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    labels = torch.as_tensor(data.labels)
    bar = tqdm(total=epochs * len(data), desc="train", unit="img", disable=not progress)
    for _ in range(epochs):
        order = order_rng.permutation(len(data))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, y = data.load(idx).to(device), labels[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            bar.update(len(idx))
    bar.close()
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 1024,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits (N, C) of `images` (N, C, H, W) in eval mode, on the CPU."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, data: ImageSet, *, device: str | torch.device = "cpu") -> float:
    logits = predict_logits(model, data.all_images(), device=device)
    return float((logits.argmax(1).numpy() == data.labels).mean())


def save_model(model: ImageClassifier, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``path.pt`` (state dict) and ``path.json`` (config) atomically; returns both paths."""
    path = Path(path)
    weights, config = path.with_suffix(".pt"), path.with_suffix(".json")
    refuse_overwrite([weights, config], overwrite)
    with atomic_output(weights) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    with atomic_output(config) as tmp:
        tmp.write_text(json.dumps(model.config, indent=2, sort_keys=True) + "\n")
    return weights, config


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> ImageClassifier:
    """Rebuild a model saved by `save_model` from ``path.json`` + ``path.pt`` (no pickle)."""
    path = Path(path)
    weights, config_path = path.with_suffix(".pt"), path.with_suffix(".json")
    for p in (weights, config_path):
        if not p.exists():
            raise ProducerError(f"model file {p} does not exist")
    try:
        config = json.loads(config_path.read_text())
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (json.JSONDecodeError, RuntimeError, OSError, EOFError) as exc:
        raise ProducerError(f"cannot read model {path}: {exc}") from None
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ProducerError(f"weights in {weights} do not fit the config in {config_path}: {exc}") from None
    return model.to(device).eval()
