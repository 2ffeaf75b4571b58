"""Classifiers for the producer: built from a config, resolved by name, saved without pickle.

The network modules (the small CNN, `ImageClassifier` with the dataset's normalisation inside, so attacks
work in pixel space) are `producers.models.networks`; their names are importable from here. A saved model
is two files: ``NAME.pt`` (a state dict, read with ``torch.load(weights_only=True)``) and ``NAME.json`` (the
config needed to rebuild it).

The torchvision zoo architectures (`ZOO_ARCHS`) need the ``vision`` extra; torchvision is imported
only when one is built, and their weights come from a local file, never a download.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logitguard.files import atomic_output, refuse_overwrite

from ..data.datasets import ImageSet
from ..errors import ProducerError
from .networks import JUMPRELU_DEFAULT_K, ImageClassifier, JumpReLU, Normalize, SmallCNN, parse_activation

ZOO_ARCHS = ("resnet50", "vgg16", "densenet121")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "JUMPRELU_DEFAULT_K", "ZOO_ARCHS", "ImageClassifier", "JumpReLU", "Normalize",
    "SmallCNN", "accuracy", "build_model", "build_with_state", "import_torchvision", "load_model", "parse_activation",
    "predict_logits", "read_state", "resolve_model", "save_model", "save_state", "small_cnn_for", "train_classifier",
]

# Kept alive for the whole process: dropping a torch.library.Library removes what it defined.
_torchvision_op_stubs: torch.library.Library | None = None


def import_torchvision():
    """The torchvision module, imported on first use; ProducerError when it is missing or unusable."""
    global _torchvision_op_stubs
    try:
        import torchvision
        return torchvision
    except ImportError as exc:
        if exc.name != "torchvision":
            raise ProducerError(f"torchvision fails to import: {exc}") from None
        raise ProducerError("torchvision is not installed; install the `vision` extra: "
                            "pip install 'logitguard[vision]'") from None
    except RuntimeError as exc:
        if not re.search(r"operator torchvision::\w+ does not exist", str(exc)):
            raise ProducerError(f"torchvision fails to import: {exc}") from None
        first_error = exc
    # A torchvision wheel built for another torch (PyPI's CUDA build beside a CPU-only torch) cannot load
    # its compiled ops, and then fails at import while registering fake kernels for nms and qnms. The
    # classification models are pure Python, so declare those two schemas and import again; the
    # detection ops stay unusable, which the zoo models never call.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _torchvision_op_stubs = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            _torchvision_op_stubs.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined: the ops that did load are left alone
            pass
    try:
        import torchvision
    except RuntimeError:
        raise ProducerError(f"torchvision does not match torch {torch.__version__} ({first_error}); install "
                            "the torchvision build made for this torch") from None
    return torchvision


def _build_net(config: dict[str, Any]) -> nn.Module:
    arch = config.get("arch")
    if arch == "small-cnn":
        return SmallCNN(config["in_channels"], config["num_classes"], tuple(config["image_size"]),
                        config.get("width", 32), config.get("activation"))
    if arch in ZOO_ARCHS:
        return getattr(import_torchvision().models, arch)(weights=None, num_classes=config["num_classes"])
    raise ProducerError(f"unknown model architecture {arch!r}; known: {['small-cnn', *ZOO_ARCHS]}")


def build_model(config: dict[str, Any]) -> ImageClassifier:
    """An untrained model from a config (``arch`` plus its arguments, ``mean``, ``std``).

    ``arch`` is ``small-cnn`` (``in_channels``, ``num_classes``, ``image_size``, optional ``width`` and
    ``activation``, see `parse_activation`) or a torchvision architecture in `ZOO_ARCHS` (``num_classes``; ImageNet's ``mean`` and ``std``).
    """
    return ImageClassifier(_build_net(config), config["mean"], config["std"], config)


def _read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ProducerError(f"{what} file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ProducerError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ProducerError(f"{what} file {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def build_with_state(build: Any, state: dict[str, torch.Tensor], error: str) -> nn.Module:
    """`build()` on the meta device, then adopt `state`'s tensors: no time spent on a random init
    (VGG-16's is seconds) that the weights replace anyway. Floating weights become float32."""
    with torch.device("meta"):
        module = build()
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        module.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        raise ProducerError(f"{error}: {exc}") from None
    left_empty = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left_empty:
        raise ProducerError(f"{error}: nothing given for {left_empty}")
    return module


# DenseNet checkpoints published by torchvision name layers "norm.1" where the module is "norm1" (and
# predate BatchNorm's num_batches_tracked, which load_state_dict then fills in).
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def resolve_model(spec: str, *, weights: str | Path | None = None, num_classes: int = 1000,
                  device: str | torch.device = "cpu") -> ImageClassifier:
    """The model named by `spec`, in eval mode on `device`.

    Parameters
    ----------
    spec : a zoo architecture (`ZOO_ARCHS`), or the path stem of a model written by `save_model`.
    weights : for a zoo architecture, a local torchvision state dict (read with ``weights_only=True``,
        never downloaded). None gives a random initialisation, fit only for tests, with a warning.
    num_classes : outputs of a zoo architecture; a saved model's config fixes its own.
    """
    if spec not in ZOO_ARCHS:
        if weights is not None:
            raise ProducerError(f"weights {weights} apply only to zoo architectures {list(ZOO_ARCHS)}; "
                                f"{spec!r} is a saved model with its own weights")
        stem = Path(spec)
        if not stem.with_suffix(".pt").exists() and not stem.with_suffix(".json").exists():
            raise ProducerError(f"model {spec!r} is neither a zoo architecture {list(ZOO_ARCHS)} nor a "
                                f"saved model ({stem.with_suffix('.pt')} and {stem.with_suffix('.json')} "
                                "do not exist)")
        return load_model(spec, device=device)
    config = {"arch": spec, "num_classes": num_classes, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
              "weights": None if weights is None else str(weights)}
    if weights is None:
        warnings.warn(f"{spec} has random weights (no weights file given): its logits mean nothing; "
                      "use this only in tests", stacklevel=2)
        return build_model(config).to(device).eval()
    import_torchvision()  # a missing torchvision is reported before the weights are read
    state = _read_state_dict(Path(weights), "weights")
    if spec.startswith("densenet"):
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    net = build_with_state(lambda: _build_net(config), state,
                            f"weights in {weights} do not fit {spec} with {num_classes} classes")
    return ImageClassifier(net, IMAGENET_MEAN, IMAGENET_STD, config).to(device).eval()


def small_cnn_for(data: ImageSet, **extra: Any) -> ImageClassifier:
    """A SmallCNN shaped for `data`, normalised with its per-channel pixel mean and std.

    `extra` goes into the config; ``width=W`` sets the SmallCNN width (default 32).
    """
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
    """Train `model` with Adam and cross-entropy on `data`; deterministic given `seed` on the CPU.

    The ``ce`` objective of `producers.models.training.train_model`, which has the others (RCE, PGD-AT, ALP, …).
    """
    from .training import train_model

    return train_model(model, data, "ce", epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                       device=device, progress=progress)


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


def save_state(module: nn.Module, config: dict[str, Any], path: str | Path, *, overwrite: bool = False
               ) -> tuple[Path, Path]:
    """Write ``path.pt`` (`module`'s state dict, on the CPU) and ``path.json`` (`config`) atomically: the
    two-file, pickle-free format of every saved network of the producer. Returns both paths."""
    path = Path(path)
    weights, config_path = path.with_suffix(".pt"), path.with_suffix(".json")
    refuse_overwrite([weights, config_path], overwrite, error=ProducerError)
    with atomic_output(weights, overwrite=overwrite) as tmp:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp)
    with atomic_output(config_path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights, config_path


def read_state(path: str | Path, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path, Path]:
    """(config, state dict, weights path, config path) of a pair written by `save_state`; the weights are
    read with ``weights_only=True``. ProducerError naming `what` when a file is missing or unreadable."""
    path = Path(path)
    weights, config_path = path.with_suffix(".pt"), path.with_suffix(".json")
    for p in (weights, config_path):
        if not p.is_file():
            raise ProducerError(f"{what} file {p} does not exist")
    try:
        config = json.loads(config_path.read_text())
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (json.JSONDecodeError, UnicodeDecodeError, RuntimeError, OSError, EOFError,
            pickle.UnpicklingError) as exc:
        raise ProducerError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(state, Mapping):
        raise ProducerError(f"cannot read {what} {path}: {config_path} must hold a JSON object and "
                            f"{weights} a state dict")
    return config, dict(state), weights, config_path


def save_model(model: ImageClassifier, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``path.pt`` (state dict) and ``path.json`` (config) atomically; returns both paths."""
    return save_state(model, model.config, path, overwrite=overwrite)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> ImageClassifier:
    """Rebuild a model saved by `save_model` from ``path.json`` + ``path.pt`` (no pickle)."""
    config, state, weights, config_path = read_state(path, "model")
    if config.get("arch") in ZOO_ARCHS:
        import_torchvision()  # never first imported under the meta device, where its tensors would be empty
    try:
        model = build_with_state(lambda: build_model(config), state,
                                  f"weights in {weights} do not fit the config in {config_path}")
    except KeyError as exc:
        raise ProducerError(f"config {config_path} lacks the key {exc}") from None
    return model.to(device).eval()
