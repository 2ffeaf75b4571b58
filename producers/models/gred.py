"""GRED (seed 002, Li et al.): input-sensitivity guided detection and rectification, in image space.

GRED protects a trained classifier f (the *target*) with two parts, both trained here on images:

- **Detector.** Two small binary CNNs (clean = 0, adversarial = 1), shaped like `SmallCNN`: ``det_image``
  sees the image x, ``det_insen`` its InSen map g = |∂ CE(f(x), ŷ) / ∂x| (`producers.models.insen.insen_maps`),
  divided by its per-image maximum so it lies in [0, 1]. Both are trained with cross-entropy on the
  training images and their PGD counterparts (the project's `PGD` on f). At test time the network with the
  lower binary entropy decides (the paper's Eq. 11-12); the *score* is that network's P(adversarial).
- **Rectifier.** A copy of f fine-tuned on InSen-masked images (clean and PGD, true labels, a fresh mask
  every batch). A pixel is a suspect when g > Smin + τ (Smax − Smin) over its image (Eq. 13, the paper's
  α is our τ = ``mask_threshold``); each suspect is replaced, with probability ``mask_prob`` (the paper's
  Bernoulli u, whose rate it does not give), by a draw from N(mean, std) of the image's pixels, clipped
  to [0, 1] (Eq. 14; the paper draws integers in [0, 255]). Colour images: every channel value is a pixel.
  The rectified label is the rectifier's prediction on one masked copy of the input.

A saved GRED is ``STEM.pt`` (one state dict: ``target.*``, ``det_image.*``, ``det_insen.*``,
``rectifier.*``; read with ``weights_only=True``) and ``STEM.json`` (the configs to rebuild each part and
the training settings). The target travels with it because the InSen maps are the target's gradients;
`load_gred` callers check it is the model they export (`check_target`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from logitguard.files import file_sha256

from ..attacks.pgd import PGD
from ..data.datasets import ImageSet
from ..errors import ProducerError
from .insen import insen_maps
from .classifiers import ImageClassifier, build_with_state, build_model, read_state, save_state

SYSTEM = "gred"
PARTS = ("target", "det_image", "det_insen", "rectifier")
_TINY = 1e-12


class GRED(nn.Module):
    """The four networks of a trained GRED and its `config` (JSON-ready); every input is (N, C, H, W) in [0, 1]."""

    def __init__(self, target: ImageClassifier, det_image: ImageClassifier, det_insen: ImageClassifier,
                 rectifier: ImageClassifier, config: dict[str, Any]):
        super().__init__()
        self.target, self.det_image, self.det_insen, self.rectifier = target, det_image, det_insen, rectifier
        self.config = config

    @property
    def settings(self) -> dict[str, Any]:
        return self.config["settings"]

    def insen(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(g, g normalised to [0, 1] per image), both (N, C, H, W): the target's InSen maps of `x`."""
        g, _ = insen_maps(self.target, x)
        return g, normalise_map(g)

    @torch.no_grad()
    def detect(self, x: Tensor, g_norm: Tensor) -> tuple[Tensor, Tensor]:
        """(score (N,), image network decided (N,) bool): P(adversarial) of the more confident network."""
        p_image = self.det_image(x).float().softmax(1)
        p_insen = self.det_insen(g_norm).float().softmax(1)
        use_image = binary_entropy(p_image) < binary_entropy(p_insen)
        return torch.where(use_image, p_image[:, 1], p_insen[:, 1]), use_image

    @torch.no_grad()
    def rectify(self, x: Tensor, g: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Labels (N,) of the rectifier on one InSen-masked copy of `x`."""
        masked = insen_mask(x, g, threshold=self.settings["mask_threshold"], prob=self.settings["mask_prob"],
                            generator=generator)
        return self.rectifier(masked).argmax(1)

    def verdict(self, images: Tensor, *, generator: torch.Generator | None = None, batch_size: int = 256,
                device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """(score float32 (N,), rectified label int64 (N,)) of `images` (N, C, H, W), in batches on `device`.

        The label is the rectifier's on every row; the paper's pipeline uses it only where score > 0.5.
        """
        self.to(device).eval()
        scores, labels = [], []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device, torch.float32)
            g, g_norm = self.insen(x)
            scores.append(self.detect(x, g_norm)[0].cpu())
            labels.append(self.rectify(x, g, generator).cpu())
        if not scores:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return torch.cat(scores).numpy().astype(np.float32), torch.cat(labels).numpy().astype(np.int64)


def normalise_map(g: Tensor) -> Tensor:
    """`g` (N, …) ≥ 0 divided by its per-image maximum: a scale-free map in [0, 1] (all-zero maps stay 0)."""
    peak = g.flatten(1).amax(1).clamp_min(_TINY)
    return g / peak.view(-1, *([1] * (g.ndim - 1)))


def binary_entropy(p: Tensor) -> Tensor:
    """Entropy in bits (N,) of two-class probabilities `p` (N, 2) (Eq. 11)."""
    return -(p * p.clamp_min(_TINY).log2()).sum(1)


def insen_mask(x: Tensor, g: Tensor, *, threshold: float, prob: float,
               generator: torch.Generator | None = None) -> Tensor:
    """`x` (N, C, H, W) with its suspect pixels (g > Smin + threshold (Smax − Smin), per image) replaced,
    each with probability `prob`, by a draw from N(mean, std) of that image's pixels, clipped to [0, 1]."""
    flat = g.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    shape = (-1, *([1] * (x.ndim - 1)))
    suspect = g > (low + threshold * (high - low)).view(shape)
    flip = torch.rand(x.shape, generator=generator, device=x.device) < prob
    pixels = x.flatten(1)
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    draws = (pixels.mean(1).view(shape) + pixels.std(1).view(shape) * noise).clamp(0.0, 1.0)
    return torch.where(suspect & flip, draws, x)


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield torch.as_tensor(order[start:start + batch_size])


def train_gred(
    target: ImageClassifier,
    data: ImageSet,
    *,
    train_samples: int | None = 2000,
    epochs: int = 5,
    eps: float = 16 / 255,
    alpha: float | None = None,
    steps: int = 10,
    width: int = 16,
    lr: float = 1e-3,
    rectifier_lr: float = 5e-4,
    mask_threshold: float = 0.5,
    mask_prob: float = 0.5,
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> GRED:
    """Train GRED's detector and rectifier for `target` on `train_samples` images of `data` (seeded choice).

    The adversarial half is untargeted L-inf PGD on the target (budget `eps`, `steps` steps of `alpha`,
    default eps/4, random start). Each of the three networks trains for `epochs` epochs with Adam on the
    clean and adversarial images together (2 x train_samples); the rectifier starts from the target's weights.
    """
    check_settings(train_samples=train_samples, epochs=epochs, eps=eps, alpha=alpha, steps=steps, width=width,
                    lr=lr, rectifier_lr=rectifier_lr, mask_threshold=mask_threshold, mask_prob=mask_prob,
                    batch_size=batch_size)
    if target.config.get("num_classes") != data.num_classes:
        raise ProducerError(f"the model has {target.config.get('num_classes')} outputs but the dataset has "
                            f"{data.num_classes} classes")
    device = torch.device(device)
    alpha = eps / 4 if alpha is None else alpha
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    rows = np.sort(rng.permutation(len(data))[: train_samples or len(data)])
    target = copy.deepcopy(target).to(device).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    x = data.load(rows).float()
    y = torch.as_tensor(data.labels[rows], dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    attack = PGD(target, eps=eps, alpha=alpha, steps=steps, batch_size=batch_size, device=device)
    x_adv = attack(x, y, generator=generator)
    images = torch.cat([x, x_adv])  # on the CPU; batches go to `device`
    labels = torch.cat([y, y])
    is_adv = torch.cat([torch.zeros(len(x), dtype=torch.long), torch.ones(len(x), dtype=torch.long)])
    g = torch.cat([insen_maps(target, images[i:i + batch_size].to(device))[0].cpu()
                   for i in range(0, len(images), batch_size)])

    channels, h, w = data.image_shape
    det_image, det_insen = (build_model(_detector_config(target.config, channels, h, w, width, normalised=n)).to(device)
                            for n in (True, False))
    rectifier = copy.deepcopy(target)
    for p in rectifier.parameters():
        p.requires_grad_(True)
    det_opt = torch.optim.Adam([*det_image.parameters(), *det_insen.parameters()], lr=lr)
    rec_opt = torch.optim.Adam(rectifier.parameters(), lr=rectifier_lr)
    mask_gen = torch.Generator(device=device).manual_seed(seed + 1)
    bar = tqdm(total=epochs * len(images), desc="gred", unit="img", disable=not progress)
    for module in (det_image, det_insen, rectifier):
        module.train()
    for _ in range(epochs):
        for idx in _batches(len(images), batch_size, rng):
            xb, gb = images[idx].to(device), g[idx].to(device)
            tb, yb = is_adv[idx].to(device), labels[idx].to(device)
            det_opt.zero_grad(set_to_none=True)
            (F.cross_entropy(det_image(xb), tb) + F.cross_entropy(det_insen(normalise_map(gb)), tb)).backward()
            det_opt.step()
            masked = insen_mask(xb, gb, threshold=mask_threshold, prob=mask_prob, generator=mask_gen)
            rec_opt.zero_grad(set_to_none=True)
            F.cross_entropy(rectifier(masked), yb).backward()
            rec_opt.step()
            bar.update(len(idx))
    bar.close()
    config = {
        "system": SYSTEM,
        "target": dict(target.config),
        "detector": {"arch": "small-cnn", "width": width, "image_shape": [channels, h, w]},
        "settings": {"mask_threshold": mask_threshold, "mask_prob": mask_prob},
        "train": {"dataset": data.name, "split": data.split, "samples": len(rows), "epochs": epochs,
                  "attack": "pgd", "eps": eps, "alpha": alpha, "steps": steps, "random_start": True, "lr": lr,
                  "rectifier_lr": rectifier_lr, "batch_size": batch_size, "seed": seed,
                  "attack_success": float((target_pred(target, x_adv, batch_size, device) != y).float().mean())},
    }
    return GRED(target, det_image.eval(), det_insen.eval(), rectifier.eval(), config).cpu()


@torch.no_grad()
def target_pred(model: nn.Module, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Predicted labels (N,) on the CPU of `images` (N, C, H, W)."""
    return torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def check_settings(**values: Any) -> None:
    """ProducerError naming the setting when one is out of range, before any work."""
    for name in ("epochs", "steps", "width", "batch_size"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProducerError(f"GRED {name} must be a positive integer, got {value!r}")
    n = values["train_samples"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
        raise ProducerError(f"GRED train samples must be an integer of at least 2, got {n!r}")
    for name in ("eps", "alpha", "lr", "rectifier_lr"):
        value = values[name]
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ProducerError(f"GRED {name} must be a positive number, got {value!r}")
    for name in ("eps", "alpha"):
        if values[name] is not None and values[name] > 1:
            raise ProducerError(f"GRED {name} must be at most 1 (pixels in [0, 1]), got {values[name]!r}")
    for name in ("mask_threshold", "mask_prob"):
        value = values[name]
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ProducerError(f"GRED {name} must be a number in [0, 1], got {value!r}")


def save_gred(gred: GRED, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``path.pt`` (one state dict, parts prefixed) and ``path.json`` (config) atomically; no pickle."""
    return save_state(gred, gred.config, path, overwrite=overwrite)


def load_gred(path: str | Path, *, device: str | torch.device = "cpu") -> GRED:
    """Rebuild a GRED saved by `save_gred` from ``path.json`` + ``path.pt`` (``weights_only=True``)."""
    config, state, weights, config_path = read_state(path, "GRED")
    if config.get("system") != SYSTEM:
        raise ProducerError(f"{path} is not a saved GRED: {config_path} must hold a JSON object with "
                            f"system {SYSTEM!r} and {weights} a state dict")
    try:
        target_config = config["target"]
        channels, h, w = (int(v) for v in config["detector"]["image_shape"])
        width = int(config["detector"]["width"])
        configs = {"target": target_config, "rectifier": target_config,
                   "det_image": _detector_config(target_config, channels, h, w, width, normalised=True),
                   "det_insen": _detector_config(target_config, channels, h, w, width, normalised=False)}
        missing = {"mask_threshold", "mask_prob"} - set(config["settings"])
        if missing:
            raise KeyError(sorted(missing))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProducerError(f"GRED config {config_path} is incomplete ({exc!r})") from None
    parts = {}
    for name in PARTS:
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        parts[name] = build_with_state(lambda c=configs[name]: build_model(c), sub,
                                        f"weights {name}.* in {weights} do not fit {config_path}")
    return GRED(**parts, config=config).to(device).eval()


def _detector_config(target_config: dict[str, Any], channels: int, h: int, w: int, width: int, *,
                     normalised: bool) -> dict[str, Any]:
    """A two-class SmallCNN's config: the target's normalisation for images; none for InSen maps (in [0, 1])."""
    mean, std = ((target_config["mean"], target_config["std"]) if normalised
                 else ([0.0] * channels, [1.0] * channels))
    return {"arch": "small-cnn", "in_channels": channels, "num_classes": 2, "image_size": [h, w], "width": width,
            "mean": list(mean), "std": list(std)}


def check_target(gred: GRED, model: nn.Module, where: str) -> None:
    """Refuse a GRED trained for another model than `model` (its InSen maps would be another model's)."""
    mine = {k: v.detach().cpu() for k, v in gred.target.state_dict().items()}
    theirs = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    same = mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k].to(mine[k].dtype)) for k in mine)
    if not same:
        raise ProducerError(f"{where} was trained for another model than the one exported (its target's weights "
                            "differ); train it for this --model with `logitguard-produce gred`")


def parse_external(spec: str) -> tuple[str, Path]:
    """``"gred:STEM"`` → ``("gred", Path(STEM))``; ProducerError for another form or system."""
    system, sep, stem = spec.partition(":")
    if not sep or not stem or system != SYSTEM:
        raise ProducerError(f"--external takes SYSTEM:STEM with SYSTEM {SYSTEM!r} (a GRED saved by "
                            f"`logitguard-produce gred`), got {spec!r}")
    return system, Path(stem)


def load_external(spec: str, model: nn.Module, *, device: str | torch.device = "cpu") -> tuple[GRED, dict[str, Any]]:
    """The image-space system named by `spec` (``gred:STEM``), checked against the exported `model`, and
    the table metadata key ``external`` describing it (system, settings, source file and its sha256)."""
    _, stem = parse_external(spec)
    gred = load_gred(stem, device=device)
    check_target(gred, model, f"GRED {stem}")
    meta = {"system": SYSTEM, "spec": str(stem), "sha256": file_sha256(stem.with_suffix(".pt")),
            "settings": dict(gred.settings), "detector": dict(gred.config["detector"]),
            "train": dict(gred.config["train"]),
            "score": "P(adversarial) of the more confident detector network",
            "label": "rectifier's label on every row (the paper uses it only where score > 0.5)"}
    return gred, meta
