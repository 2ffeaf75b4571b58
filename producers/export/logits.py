"""Export clean and adversarial logits (with noise queries) as a partitioned logit table.

Layout: ``OUT/split=S/attack=A/shard-I-of-N.parquet``. A run stages its partitions beside ``OUT`` and adds
them to it in one step at the end (`ExportStage`): ``OUT`` never holds part of a run. A rerun skips
partitions ``OUT`` already holds (refusing ones made with other settings) and resumes from the ones an
interrupted run staged with the same settings; several processes (or GPUs) given different ``--shard I/N``
fill one dataset without overlap. Deterministic given the seed and the shard layout.

An attack may be run under an alias (``pgd-eps8=pgd``), so one table can hold the same attack at two
budgets; a sweep (`Sweep`, ``--sweep pgd.eps=2/255,4/255``) runs it once per value of one parameter,
each under its own alias, and records ``sweep`` in its metadata. With a `substitute` model the attacks
are computed through it (the transfer threat model) while every exported column is the target model's:
partitions ``transfer-<alias>``. Every attack partition records its threat model in the table metadata
under ``threat``.

`export` is a thin wrapper: it makes the plan (`producers.export.plan.ExportPlan`, every check before any work)
and runs it (`producers.export.execute.run_export`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import ImageSet
from ..data.noise import NoiseRecipe
from ..models.classifiers import ImageClassifier
from .execute import ExportReport, run_export
from .plan import ExportPlan, Shard

__all__ = ["export"]


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
    insen: bool = False,
    external: str | None = None,
    seed: int = 0,
    shard: Shard = Shard(),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    substitute: str | Path | None = None,
    commit: bool = True,
    sweeps: Mapping[str, Mapping[str, Any]] | None = None,
) -> ExportReport:
    """Attack each split of `data` with each of `attacks` and write one table partition per pair.

    Parameters
    ----------
    model : the target: maps images in [0, 1] to logits. Every exported column is this model's.
    data : ``{"train": ImageSet, "test": ImageSet}`` (either may be absent).
    attacks : attack names, ``clean`` meaning the unattacked images, or ``ALIAS=ATTACK`` items (e.g.
        ``["clean", "pgd", "pgd-eps8=pgd"]``): the partition is named after the alias.
    samples : per split, how many samples to select (None: all).
    attack_samples : per attack (alias), a smaller cap on samples per split (e.g. ``{"cw": 2000}``).
    attack_params : per attack (alias), parameters overriding the attack's defaults.
    noise : the noise recipe; None stores no ``noisy_logits``.
    features : also store penultimate-layer features.
    insen : also store the InSen statistics of each stored input (``insen``, `producers.models.insen.insen_stats`).
    external : ``gred:STEM``: also store a saved GRED's verdict on each stored input (``external_score``,
        ``external_label``; metadata key ``external``), `producers.models.gred.load_external`.
    metadata : extra table metadata (``dataset``, ``model``, …).
    substitute : path stem of a saved model (`producers.models.classifiers.save_model`). When given, every attack is
        computed through it and written as partition ``transfer-<alias>`` with threat model ``transfer``;
        ``clean`` is written as usual (the same rows as without a substitute).

    sweeps : per alias, the ``sweep`` entry its partition's ``attacks`` metadata records (``{"name": "pgd.eps",
        "attack": "pgd", "param": "eps", "value": 0.0078}``), as `expand_sweeps` returns it with the aliases.
    commit : False leaves this shard's partitions staged (``report.staged``, relative to its staging
        directory) for a caller that commits several shards in one step (`producers.export.scale`).

    Everything is checked before any attack runs: names, aliases, parameters, counts (when the `ExportPlan` is
    made), and that tables already under `out` agree with the metadata this export would write (`run_export`).
    """
    plan = ExportPlan(
        model, data, attacks=attacks, out=Path(out), samples=samples, attack_samples=attack_samples or {},
        attack_params=attack_params or {}, noise=noise, features=features, insen=insen, external=external, seed=seed,
        shard=shard, batch_size=batch_size, device=torch.device(device), metadata=metadata or {},
        substitute=None if substitute is None else Path(substitute), sweeps=sweeps or {},
    )
    return run_export(plan, progress=progress, commit=commit)
