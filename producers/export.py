"""Export clean and adversarial logits (with noise queries) as a partitioned logit table.

Layout: ``OUT/split=S/attack=A/shard-I-of-N.parquet``. Each (split, attack, shard) file is written once,
atomically; a rerun skips files that exist, so an interrupted export resumes where it stopped, and
several processes (or GPUs) given different ``--shard I/N`` fill one dataset without overlap.
Deterministic given the seed and the shard layout.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from logitguard.tables import CLEAN, LogitTable, write_table

from . import __version__
from .attacks import make_attack
from .datasets import ImageSet
from .errors import ProducerError
from .models import ImageClassifier
from .noise import NoiseRecipe, noise_queries

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Shard:
    """Slice `index` of `count` disjoint slices of the selected samples (every count-th sample)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, spec: str) -> Shard:
        try:
            index, count = (int(p) for p in spec.split("/"))
        except ValueError:
            raise ProducerError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}") from None
        if not 0 <= index < count:
            raise ProducerError(f"--shard {spec}: need 0 <= I < N")
        return cls(index, count)

    @property
    def basename(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


@dataclass
class ExportReport:
    """What one export did: files written and skipped, and seconds and rows per (split, attack)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)


def select_samples(num_available: int, n: int | None, seed: int, split: str) -> np.ndarray:
    """The first `n` of a seeded permutation of the split (all when `n` is None), sorted.

    Every attack draws from this same list, so attacked rows always have clean partners; an attack with
    a smaller cap takes a prefix of the permutation.
    """
    order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(num_available)
    return order if n is None else order[: min(n, num_available)]


def export(
    model: ImageClassifier,
    data: Mapping[str, ImageSet],
    *,
    attacks: Sequence[str],
    out: str | Path,
    samples: Mapping[str, int | None],
    attack_samples: Mapping[str, int] | None = None,
    attack_params: Mapping[str, Mapping[str, Any]] | None = None,
    noise: NoiseRecipe | None = None,
    features: bool = False,
    seed: int = 0,
    shard: Shard = Shard(),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ExportReport:
    """Attack each split of `data` with each of `attacks` and write one table partition per pair.

    Parameters
    ----------
    model : maps images in [0, 1] to logits.
    data : ``{"train": ImageSet, "test": ImageSet}`` (either may be absent).
    attacks : attack names; ``clean`` means the unattacked images.
    samples : per split, how many samples to select (None: all).
    attack_samples : per attack, a smaller cap on samples per split (e.g. ``{"cw": 2000}``).
    attack_params : per attack, parameters overriding the attack's defaults.
    noise : the noise recipe; None stores no ``noisy_logits``.
    features : also store penultimate-layer features.
    metadata : extra table metadata (``dataset``, ``model``, …).
    """
    out = Path(out)
    device = torch.device(device)
    model = model.to(device).eval()
    attack_samples = dict(attack_samples or {})
    attack_params = {k: dict(v) for k, v in (attack_params or {}).items()}
    unknown = sorted(set(attack_params) - set(attacks))
    if unknown:
        raise ProducerError(f"parameters given for attack(s) {unknown} that are not being run")
    # Build every attack up front so a bad name or parameter fails before hours of work.
    built = {a: make_attack(a, model, batch_size=batch_size, device=device, **attack_params.get(a, {}))
             for a in attacks if a != CLEAN}
    class_names = next(iter(data.values())).class_names
    if model.config["num_classes"] != len(class_names):
        raise ProducerError(
            f"the model has {model.config['num_classes']} outputs but the dataset has {len(class_names)} classes"
        )
    base_meta = {
        **dict(metadata or {}),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "noise": None if noise is None else {**noise.to_metadata(), "seed": seed},
        "producer": {"name": "logitguard-produce", "version": __version__},
        "seed": seed,
    }
    report = ExportReport()
    for split, dataset in data.items():
        selected = select_samples(len(dataset), samples.get(split), seed, split)
        for attack in attacks:
            target = out / f"split={split}" / f"attack={attack}" / f"{shard.basename}.parquet"
            if target.exists():
                report.skipped.append(target)
                continue
            cap = attack_samples.get(attack)
            rows = np.sort(selected[:cap][shard.index::shard.count])
            params = {} if attack == CLEAN else built[attack].params()
            started = time.perf_counter()
            table = _export_partition(
                model, dataset, rows, attack=attack, attacker=built.get(attack), noise=noise,
                features=features, generator_seed=[seed, zlib.crc32(f"{split}/{attack}".encode()), shard.index],
                batch_size=batch_size, device=device,
                metadata={**base_meta, "attacks": {attack: params} if attack != CLEAN else {}},
                progress=progress,
            )
            report.written += write_table(table, target)
            seconds = time.perf_counter() - started
            report.timings.append({"split": split, "attack": attack, "rows": len(rows), "seconds": seconds})
    return report


def _export_partition(
    model: ImageClassifier,
    data: ImageSet,
    rows: np.ndarray,
    *,
    attack: str,
    attacker,
    noise: NoiseRecipe | None,
    features: bool,
    generator_seed: list[int],
    batch_size: int,
    device: torch.device,
    metadata: dict[str, Any],
    progress: bool,
) -> LogitTable:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence(generator_seed).generate_state(1)[0]))
    columns: dict[str, list[np.ndarray]] = {}
    chunk = max(batch_size, 1024)  # images loaded at a time; the attack batches within a chunk
    bar = tqdm(total=len(rows), desc=f"{data.split}/{attack}", unit="img", disable=not progress)
    for start in range(0, len(rows), chunk):
        idx = rows[start:start + chunk]
        x = data.load(idx)
        y = torch.as_tensor(data.labels[idx])
        if attacker is None:
            x_adv = x
            bar.update(len(idx))
        else:
            x_adv = attacker(x, y, generator=generator, on_batch=bar.update)
        with torch.no_grad():
            logits = _batched(model, x_adv, batch_size, device)
            clean_pred = logits.argmax(1) if attacker is None else _batched(model, x, batch_size, device).argmax(1)
        pred = logits.argmax(1)
        delta = (x_adv - x).flatten(1)
        part = {
            "sample_id": idx.astype(np.int64),
            "label": data.labels[idx],
            "logits": logits.numpy(),
            "pred": pred.numpy(),
            "linf": delta.abs().amax(1).numpy(),
            "l2": delta.norm(dim=1).numpy(),
        }
        # Recomputed, never the attack's own flag; always False on clean rows.
        part["success"] = ((clean_pred == y) & (pred != y)).numpy()
        if noise is not None:
            part["noisy_logits"] = noise_queries(model, x_adv, noise, generator=generator,
                                                 batch_size=8 * batch_size, device=device).numpy()
        if features:
            with torch.no_grad():
                feats = _batched(model.penultimate, x_adv, batch_size, device)
            part["features"] = feats.numpy()
        for name, values in part.items():
            columns.setdefault(name, []).append(values)
    bar.close()
    arrays = {name: np.concatenate(parts) for name, parts in columns.items()}
    return LogitTable.from_arrays(split=data.split, attack=attack, metadata=metadata, **arrays)


def _batched(fn, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])
