"""Export on Ray: the shards of one export run in parallel actors, and their partitions are committed together.

`export_ray` takes what `producers.export.logits.export` takes and starts N actors, one per shard: one GPU each
when the model runs on CUDA (N defaults to the GPUs in the Ray cluster), else `cpus_per_worker` CPUs each
(N defaults to the CPUs divided by that). The model goes to the object store once, each actor loads the
dataset (or receives it through the object store); actor i runs shard i/N of `export` (exactly what ``logitguard-produce export --shard i/N`` runs) and leaves its
partitions staged. When every shard has finished, the driver adds all staged partitions to `out` in one step
(`logitguard.files.StagedDirectory`): `out` holds all of this run or none of it. The table equals the N
single-process ``--shard i/N`` runs, file for file and row for row.

A failed or killed run leaves `out` as it was and each shard's finished partitions staged; a rerun with the
same N resumes from them (the staging directories are ``.<out>.resume-shard-i-of-N``, beside `out`: the
workers must share that file system with the driver).
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray

from logitguard.files import StagedDirectory, link_or_copy
from logitguard.engines.ray import RayErrors, init_ray
from logitguard.tables import CLEAN, METADATA_KEY

from ..data.datasets import ImageSet
from ..errors import ProducerError
from .logits import export
from producers.export.staging import check_existing
from producers.export.plan import Shard, check_sample_counts
from producers.export.execute import ExportReport
from producers.export.attack_specs import TRANSFER_PREFIX, plan_attacks
from ..models.classifiers import ImageClassifier

__all__ = ["commit_shards", "default_workers", "export_ray", "load_splits"]

_SHARD_FILE = re.compile(r"shard-(\d+)-of-(\d+)\.parquet")


class _ShardWorker:
    """One actor: holds the model (on its device) and the dataset, and runs shards of `export`."""

    def __init__(self, model: ImageClassifier, data: Mapping[str, ImageSet] | Callable[[], Mapping[str, ImageSet]],
                 device: str, threads: int) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = device
        self.model = model.to(device).eval()
        self.data = dict(data() if callable(data) else data)

    def run(self, shard: Shard, out: str, options: dict[str, Any]) -> ExportReport:
        return export(self.model, self.data, out=out, shard=shard, device=self.device, progress=False,
                      commit=False, **options)


def load_splits(dataset: str, splits: Sequence[str], root: str | None = None) -> dict[str, ImageSet]:
    """``{split: ImageSet}`` as the export command loads them: `export_ray` calls it in each actor."""
    from ..data.datasets import load_dataset

    return {split: load_dataset(dataset, split, root=root) for split in splits}


def default_workers(device: str, cpus_per_worker: float = 1) -> int:
    """One worker per GPU of the Ray cluster for a CUDA device, else one per `cpus_per_worker` CPUs."""
    resources = ray.cluster_resources()
    if str(device).startswith("cuda"):
        return int(resources.get("GPU", 0))
    return max(1, int(resources.get("CPU", 1) // cpus_per_worker))


def export_ray(
    model: ImageClassifier,
    data: Mapping[str, ImageSet] | Callable[[], Mapping[str, ImageSet]],
    *,
    out: str | os.PathLike,
    workers: int | None = None,
    device: str = "cpu",
    cpus_per_worker: float = 1,
    **options: Any,
) -> ExportReport:
    """`producers.export.logits.export` with its shards run by Ray actors in parallel, committed in one step.

    Parameters
    ----------
    model, options : as for `export` (``attacks``, ``samples``, ``attack_params``, ``noise``, …; not ``shard``,
        ``device`` or ``progress``). The model goes to the actors through the object store.
    data : as for `export`, or a loader called in each actor (e.g. ``functools.partial(load_splits, "mnist",
        ["test"], root)``): on a cluster each node then reads the dataset itself, and the actors' images are
        those of a single-process run bit for bit (a mapping travels pickled, and a loader's arrays can come
        back with other strides, which torch's CPU kernels may round differently).
    workers : N, the number of actors and shards (default `default_workers`). The shard layout fixes the
        files (``shard-i-of-N``) and the random draws: to resume or extend a table, use the same N.
    device : ``cuda`` (any CUDA device): one GPU per actor; else CPU actors with `cpus_per_worker` CPUs
        (and as many torch threads) each.

    Returns
    -------
    The merged `ExportReport` (timings carry their ``shard``).
    """
    out = Path(out)
    for name in ("shard", "device", "progress", "commit"):
        if name in options:
            raise ProducerError(f"export_ray chooses {name!r} itself")
    specs = plan_attacks(options["attacks"], options.get("attack_params"), options.get("attack_samples"))
    check_sample_counts(options["samples"])
    gpu = str(device).startswith("cuda")
    if not cpus_per_worker > 0:
        raise ProducerError(f"CPUs per worker must be positive, got {cpus_per_worker}")
    init_ray(quiet=not sys.stderr.isatty())
    count = workers if workers is not None else default_workers(device, cpus_per_worker)
    if count < 1:
        raise ProducerError("the Ray cluster has no GPU for --device cuda; use --device cpu or add GPU nodes")
    prefix = TRANSFER_PREFIX if options.get("substitute") is not None else ""
    _check_layout(out, {CLEAN if s.name == CLEAN else prefix + s.name for s in specs}, count)

    worker = ray.remote(_ShardWorker).options(num_cpus=0 if gpu else cpus_per_worker, num_gpus=1 if gpu else 0)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    model_ref = ray.put(model if on_cpu else copy.deepcopy(model).cpu())
    data_ref = data if callable(data) else ray.put(dict(data))
    actors = [worker.remote(model_ref, data_ref, "cuda" if gpu else str(device), 0 if gpu else int(cpus_per_worker))
              for _ in range(count)]
    try:
        with RayErrors():
            reports = ray.get([actor.run.remote(Shard(i, count), str(out), options) for i, actor in enumerate(actors)])
    finally:
        for actor in actors:
            ray.kill(actor)
    merged = ExportReport()
    for i, report in enumerate(reports):
        merged.skipped += report.skipped
        merged.timings += [{**t, "shard": i} for t in report.timings]
    merged.written = commit_shards(out, [(Shard(i, count).basename, r.staged) for i, r in enumerate(reports)])
    return merged


def commit_shards(out: str | os.PathLike, staged: list[tuple[str, list[str]]]) -> list[Path]:
    """Add the partitions staged by several shards (``[(shard basename, [relative paths])]``, each in its
    ``.<out>.resume-<basename>`` directory) to `out` in one step; then remove those staging directories.

    Under `out`'s lock the staged metadata is checked against the tables already in `out` (as each shard's
    own commit would). On failure `out` is unchanged and every shard's staging is kept (resume).
    """
    out = Path(out)
    stages = []
    try:
        for key, _ in staged:  # each shard's staging, locked: no other run resumes from it meanwhile
            stages.append(StagedDirectory(out, resume_key=key, error=ProducerError))
    except BaseException:
        for stage in stages:
            stage.close()
        raise
    combined = StagedDirectory(out, error=ProducerError)
    try:
        files = []
        for stage, (_, rels) in zip(stages, staged):
            for rel in rels:
                source = stage.path / rel
                if not source.is_file():
                    raise ProducerError(f"a Ray worker staged {rel} where this machine cannot see it ({stage.path}): "
                                        "put --out on a file system shared by the driver and every worker")
                (combined.path / rel).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(source, combined.path / rel)
                files.append(rel)
        written = combined.commit(files, check=lambda: _check_staged(out, combined.path, files)) if files else []
        if not files:
            combined.discard()
    except BaseException:
        combined.discard()
        for stage in stages:
            stage.close()
        raise
    for stage in stages:
        stage.discard()
    return written


def _check_staged(out: Path, root: Path, files: list[str]) -> None:
    """`_check_existing` for the staged files: their metadata agrees with every table file already in `out`."""
    base: dict[str, Any] = {}
    partitions: dict[str, dict[str, Any]] = {}
    for rel in files:
        meta = json.loads((pq.read_schema(root / rel).metadata or {}).get(METADATA_KEY) or b"{}")
        name = Path(rel).parts[1].partition("=")[2]
        base = {k: v for k, v in meta.items() if k not in ("attacks", "threat", "schema_version")}
        partitions[name] = {key: {name: meta[key][name]} for key in ("attacks", "threat")
                            if name in (meta.get(key) or {})}
    check_existing(out, base, partitions)


def _check_layout(out: Path, names: set[str], count: int) -> None:
    """Refuse to add shards of another layout to a partition `out` already holds (the same samples twice)."""
    if not out.is_dir():
        return
    for file in sorted(out.glob("split=*/attack=*/shard-*-of-*.parquet")):
        match = _SHARD_FILE.fullmatch(file.name)
        attack = file.parent.name.partition("=")[2]
        if match and attack in names and int(match.group(2)) != count:
            theirs = int(match.group(2))
            raise ProducerError(f"{out} holds {file.relative_to(out)}, written as {theirs} shards; this run writes "
                                f"{count} (--workers {count}), which would hold the same samples twice: use "
                                f"--workers {theirs} to resume or extend it, or another --out")
