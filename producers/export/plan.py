"""An export as a plan: what to export (`ExportPlan`), checked once when the plan is made, before any work.

The plan names the target model, the splits and how many samples of each, the attacks (with aliases,
parameters, caps and sweeps), the noise recipe, the extra columns, an optional substitute model, the seed,
the shard and where the table goes. From it follow the table metadata and one `PartitionJob` per partition
file (its split, attack, metadata and sample rows); `producers.export.execute.run_export` carries it out.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitguard.tables import CLEAN

from .. import __version__
from ..data.datasets import ImageSet
from ..data.noise import NoiseRecipe
from ..errors import ProducerError
from ..models.classifiers import ImageClassifier
from .attack_specs import TRANSFER_PREFIX, AttackSpec, plan_attacks

SPLITS = ("train", "test")


def check_sample_counts(samples: Mapping[str, int | None]) -> None:
    """Each split's sample count is a positive integer or None (all)."""
    for split, n in samples.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ProducerError(f"{split} samples must be a positive integer (or all), got {n!r}")


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


def select_samples(num_available: int, n: int | None, seed: int, split: str) -> np.ndarray:
    """The first `n` of a seeded permutation of the split (all when `n` is None), sorted.

    Every attack draws from this same list, so attacked rows always have clean partners; an attack with
    a smaller cap takes a prefix of the permutation.
    """
    order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(num_available)
    return order if n is None else order[: min(n, num_available)]


@dataclass(frozen=True, eq=False)
class PartitionJob:
    """One partition file of a plan: attack partition `name` (running `spec`) on the `rows` of `split`."""

    split: str
    name: str
    spec: AttackSpec
    metadata: dict[str, Any]
    rows: np.ndarray
    shard: Shard

    @property
    def rel(self) -> str:
        """The file's path under the table directory."""
        return f"split={self.split}/attack={self.name}/{self.shard.basename}.parquet"


@dataclass(frozen=True, eq=False)
class ExportPlan:
    """What one export writes, checked once, when it is made (`__post_init__`), before any work.

    Fields are `producers.export.logits.export`'s parameters (see there), normalised: `attacks` as given
    (names or ``ALIAS=ATTACK`` items, parsed into `specs`), `out` a `Path`, `device` a `torch.device`, the
    per-attack mappings plain dicts keyed by alias.
    """

    model: ImageClassifier
    data: Mapping[str, ImageSet]
    attacks: Sequence[str]
    out: Path
    samples: Mapping[str, int | None]
    attack_samples: Mapping[str, int] = field(default_factory=dict)
    attack_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    noise: NoiseRecipe | None = None
    features: bool = False
    insen: bool = False
    external: str | None = None
    seed: int = 0
    shard: Shard = Shard()
    batch_size: int = 256
    device: torch.device = torch.device("cpu")
    metadata: Mapping[str, Any] = field(default_factory=dict)
    substitute: Path | None = None
    sweeps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    specs: tuple[AttackSpec, ...] = field(init=False)

    def __post_init__(self) -> None:
        specs = plan_attacks(self.attacks, self.attack_params, self.attack_samples)
        sweeps = {k: dict(v) for k, v in (self.sweeps or {}).items()}
        unplanned = sorted(set(sweeps) - {s.name for s in specs if s.attack != CLEAN})
        if unplanned:
            raise ProducerError(f"sweep entries for attack(s) {unplanned} that are not being run")
        check_sample_counts(self.samples)
        if self.batch_size < 1:
            raise ProducerError(f"batch size must be at least 1, got {self.batch_size}")
        class_names = self.class_names
        if self.model.config["num_classes"] != len(class_names):
            raise ProducerError(
                f"the model has {self.model.config['num_classes']} outputs but the dataset has {len(class_names)} "
                "classes"
            )
        normalised = {
            "attacks": tuple(self.attacks), "out": Path(self.out), "samples": dict(self.samples),
            "specs": tuple(specs), "sweeps": sweeps,
            "attack_samples": dict(self.attack_samples or {}),
            "attack_params": {k: dict(v) for k, v in (self.attack_params or {}).items()},
            "device": torch.device(self.device), "metadata": dict(self.metadata or {}),
            "substitute": None if self.substitute is None else Path(self.substitute),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @property
    def class_names(self) -> list[str]:
        """The dataset's class names (those of the first split)."""
        return next(iter(self.data.values())).class_names

    def table_metadata(self, external: dict[str, Any] | None = None) -> dict[str, Any]:
        """The metadata every partition of the table records; `external` describes an external system's columns."""
        class_names = self.class_names
        return {
            **self.metadata,
            "num_classes": len(class_names),
            "class_names": list(class_names),
            "noise": None if self.noise is None else {**self.noise.to_metadata(), "seed": self.seed},
            "producer": {"name": "logitguard-produce", "version": __version__},
            "seed": self.seed,
            **({} if external is None else {"external": external}),
        }

    def partitions(self, params: Mapping[str, dict[str, Any]], substitute: dict[str, Any] | None = None,
                   ) -> list[tuple[str, AttackSpec, dict[str, Any]]]:
        """(partition name, spec, its own metadata) per attack; `params` are the built attacks' parameters by alias
        and `substitute` describes the substitute model (transfer partitions) when there is one."""
        partitions = []
        for spec in self.specs:
            if spec.attack == CLEAN:
                partitions.append((CLEAN, spec, {"attacks": {}}))
                continue
            name = spec.name if substitute is None else TRANSFER_PREFIX + spec.name
            attack_params = params[spec.name]
            threat = {"model": "oblivious" if substitute is None else "transfer", "attack": spec.attack,
                      "eps": attack_params.get("eps")}
            if substitute is not None:
                threat["substitute"] = substitute
            entry = attack_params if name == spec.attack else {**attack_params, "attack": spec.attack}
            if spec.name in self.sweeps:
                entry = {**entry, "attack": spec.attack, "sweep": self.sweeps[spec.name]}
            partitions.append((name, spec, {
                "attacks": {name: entry},
                "threat": {name: threat},
            }))
        return partitions

    def jobs(self, base_meta: dict[str, Any], partitions: list[tuple[str, AttackSpec, dict[str, Any]]],
             ) -> list[PartitionJob]:
        """One job per (split, partition): this shard's slice of the selected samples, under the attack's cap."""
        jobs = []
        for split, dataset in self.data.items():
            selected = select_samples(len(dataset), self.samples.get(split), self.seed, split)
            for name, spec, partition_meta in partitions:
                rows = np.sort(selected[:self.attack_samples.get(spec.name)][self.shard.index::self.shard.count])
                jobs.append(PartitionJob(split, name, spec, {**base_meta, **partition_meta}, rows, self.shard))
        return jobs
