"""Carrying out an export plan: attacks run batch by batch, partitions staged, then added to the table at once.

`run_export` takes an `ExportPlan` (`producers.export.plan`): it moves the model to the plan's device, loads the
substitute and the external system, builds every attack (a bad name or parameter fails before any work), checks
the table already under ``OUT`` (`producers.export.staging`), then computes each partition (`export_partition`)
that is neither in ``OUT`` nor staged by an interrupted run, and commits them together.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from logitguard.defenses.decision import successful_attack
from logitguard.files import file_sha256
from logitguard.tables import CLEAN, LogitTable

from ..attacks import make_attack
from ..data.datasets import ImageSet
from ..data.noise import NoiseRecipe, noise_queries
from ..errors import ProducerError
from ..models.classifiers import ImageClassifier, load_model
from ..models.insen import insen_stats
from .plan import ExportPlan
from .staging import ExportStage, check_existing


@dataclass
class ExportReport:
    """What one export did: files written and skipped, and seconds and rows per (split, attack)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    staged: list[str] = field(default_factory=list)  # with commit=False: partitions left staged, for the caller
    settled: list[str] = field(default_factory=list)  # continuations with no sample left to attack: not written


def run_export(plan: ExportPlan, *, progress: bool = True, commit: bool = True) -> ExportReport:
    """Carry out `plan`: write one table partition per (split, attack) under ``plan.out``.

    `progress` shows a bar per partition. `commit` False leaves this shard's partitions staged (``report.staged``,
    relative to its staging directory) for a caller that commits several shards in one step
    (`producers.export.scale`).
    """
    out, device, seed, shard, batch_size = plan.out, plan.device, plan.seed, plan.shard, plan.batch_size
    model = plan.model.to(device).eval()
    attacker_model, substitute_meta = model, None
    if plan.substitute is not None:
        attacker_model, substitute_meta = _load_substitute(plan.substitute, next(iter(plan.data.values())), device)
    external_system, external_meta = None, None
    if plan.external is not None:
        from ..models.gred import load_external

        external_system, external_meta = load_external(plan.external, model, device=device)
    # Build every attack up front so a bad name or parameter fails before hours of work.
    built = {s.name: make_attack(s.attack, attacker_model, batch_size=batch_size, device=device,
                                 **plan.attack_params.get(s.name, {}))
             for s in plan.specs if s.attack != CLEAN}
    base_meta = plan.table_metadata(external_meta)
    partitions = plan.partitions({name: attack.params() for name, attack in built.items()}, substitute_meta)
    existing = {n: m for n, _, m in partitions}
    check_existing(out, base_meta, existing)
    report = ExportReport()
    with ExportStage(out, shard.basename) as stage:
        todo = []
        for job in plan.jobs(base_meta, partitions):
            state = stage.classify(job.rel, job.metadata, job.name, job.rows, features=plan.features,
                                   insen=plan.insen, external=plan.external is not None)
            if state == "done":
                report.skipped.append(out / job.rel)
            elif state == "todo":
                todo.append(job)
        for job in todo:
            started = time.perf_counter()
            table = export_partition(
                model, plan.data[job.split], job.rows, attack=job.name, attacker=built.get(job.spec.name),
                noise=plan.noise, features=plan.features,
                generator_seed=[seed, zlib.crc32(f"{job.split}/{job.name}".encode()), shard.index],
                insen=plan.insen, external=external_system,
                batch_size=batch_size, device=device, metadata=job.metadata, progress=progress,
            )
            stage.write(job.rel, table)
            seconds = time.perf_counter() - started
            report.timings.append({"split": job.split, "attack": job.name, "rows": len(job.rows),
                                   "seconds": seconds})
        if not commit:
            report.staged = list(stage.files)
            return report
        report.written = stage.commit(check=lambda: check_existing(out, base_meta, existing))
    return report


def _load_substitute(stem: str | Path, data: ImageSet, device: torch.device) -> tuple[ImageClassifier, dict]:
    """The attacker's substitute model and its description for the ``threat`` metadata."""
    stem = Path(stem)
    substitute = load_model(stem, device=device)
    config = substitute.config
    if config.get("num_classes") != data.num_classes:
        raise ProducerError(f"substitute {stem} has {config.get('num_classes')} outputs but the dataset has "
                            f"{data.num_classes} classes")
    if "image_size" in config and [config.get("in_channels"), *config["image_size"]] != list(data.image_shape):
        raise ProducerError(f"substitute {stem} takes images of shape "
                            f"{[config.get('in_channels'), *config['image_size']]}, the dataset has "
                            f"{list(data.image_shape)}")
    meta = {"spec": str(stem), "sha256": file_sha256(stem.with_suffix(".pt")),
            "test_accuracy": config.get("test_accuracy"), "arch": config.get("arch")}
    if "width" in config:
        meta["width"] = config["width"]
    if isinstance(config.get("train"), dict) and "seed" in config["train"]:
        meta["seed"] = config["train"]["seed"]
    return substitute, meta

def export_partition(
    model: ImageClassifier,
    data: ImageSet,
    rows: np.ndarray,
    *,
    attack: str,
    attacker,
    noise: NoiseRecipe | None,
    features: bool,
    generator_seed: list[int],
    insen: bool = False,
    external=None,
    batch_size: int,
    device: torch.device,
    metadata: dict[str, Any],
    progress: bool,
) -> LogitTable:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence(generator_seed).generate_state(1)[0]))
    # The external system's own draws (GRED's masks), so adding it changes no other column.
    external_generator = torch.Generator(device=device)
    external_generator.manual_seed(int(np.random.SeedSequence([*generator_seed, 1]).generate_state(1)[0]))
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
        part["success"] = successful_attack(clean_pred.numpy(), pred.numpy(), y.numpy())
        if noise is not None:
            part["noisy_logits"] = noise_queries(model, x_adv, noise, generator=generator,
                                                 batch_size=8 * batch_size, device=device).numpy()
        if features:
            with torch.no_grad():
                feats = _batched(model.penultimate, x_adv, batch_size, device)
            part["features"] = feats.numpy()
        if insen:  # of the stored (attacked) input, as the model sees it
            part["insen"] = torch.cat([insen_stats(model, x_adv[i:i + batch_size].to(device)).float().cpu()
                                       for i in range(0, len(x_adv), batch_size)]).numpy()
        if external is not None:
            part["external_score"], part["external_label"] = external.verdict(
                x_adv, generator=external_generator, batch_size=batch_size, device=device)
        for name, values in part.items():
            columns.setdefault(name, []).append(values)
    bar.close()
    arrays = {name: np.concatenate(parts) for name, parts in columns.items()}
    return LogitTable.from_arrays(split=data.split, attack=attack, metadata=metadata, **arrays)


def _batched(fn, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])
