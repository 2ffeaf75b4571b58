"""Export attacks that go *through* a defense: the adaptive and surrogate threat models.

``adaptive``: the attacker has the defense's files. Each pipeline of a manifest (`logitguard.defenses.pipelines`)
is mirrored in torch (`producers.threat.mirrors`) and attacked with the defense-aware attacks
(`producers.attacks.DEFENSE_ATTACK_NAMES`); the attacked images' logits and fresh noise queries from
the target model are written as partitions ``adaptive.<pipeline>.<attack>.e<ε·255>``.

``surrogate``: the attacker knows the defense's algorithm and settings but not its files. It exports
its own logit table from training samples the defender never used, fits its own copy of every shipped
pipeline with the same recipe (`logitguard.defenses.shipped.fit_shipped`), and attacks through the copy; the
rows are written as ``surrogate.<pipeline>.<attack>.e<ε·255>`` and judged later by the real defense.

Judge draws: a randomised (noise-reading) pipeline is judged on ``judge_draws`` fresh noise draws the
attacker never saw. Draw 0 is the partition itself; draws 1..R−1 are partitions ``<partition>.r<k>`` with the
same images' logits and new noise queries from a generator stream of their own, holding only the samples the
core's NumPy pipeline (`GatedDefense`) did not break on an earlier draw (threat metadata: the parent's entry
plus ``judge_draw`` and ``judge_of``; the parent's carries ``judge_draws``). The ``suite`` attack's partition
also records ``sequence``, ``broken_by`` (per row, by sample id) and ``indicators`` in its threat entry.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitguard.defenses.pipelines import PipelineSpec, load_pipelines
from logitguard.errors import LogitguardError
from logitguard.tables import LogitTable, holdout_mask
from logitguard.tables.threat import DEFAULT_BUDGETS

from ..attacks import DEFENSE_ATTACK_NAMES, make_attack
from ..data.datasets import ImageSet
from ..errors import ProducerError
from ..export.execute import ExportReport, export_partition
from ..export.plan import select_samples
from ..export.staging import ExportStage
from ..models.classifiers import ImageClassifier
from ..data.noise import NoiseRecipe
from .judging import broken_by_partitions, export_judged, partition_rel, staged_draws, suite_record
from .pipeline import load_pipeline_mirror

TIERS = ("adaptive", "surrogate")
DEFAULT_ATTACKS = ("routes", "defended-pgd", "min-margin")
# The bare model has no detector or corrector: its routes are plain PGD (margin loss) and defended-pgd is
# PGD on cross-entropy; min-margin adds nothing there.
# APGD and the suite (which drops the detector-only attacks itself) measure the bare model too: the figure a
# pipeline's gain is taken against must come from attacks as strong as the pipeline's.
BARE_ATTACKS = ("routes", "defended-pgd", "apgd-ce", "apgd-dlr", "apgd-t", "suite")


def partition_name(tier: str, pipeline: str, attack: str, eps: float) -> str:
    """``adaptive.ln-odds.routes.e16`` for ε = 16/255. `tier` is the name's first part: a partition of another
    split than test is named ``adaptive-train.…`` (`train_prefix`), an adversarial fit's ``adaptive-round2.…``."""
    return f"{tier}.{pipeline}.{attack}.e{round(eps * 255):g}"


def split_alias(item: str) -> tuple[str, str]:
    """``(partition part, attack)`` of an `export_through` attack item: ``"lagrangian"`` names itself,
    ``"lagrangian-fool=lagrangian"`` runs ``lagrangian`` again under another partition name (a second
    continuation of one attack with other parameters)."""
    name, sep, attack = item.partition("=")
    return (name.strip(), attack.strip()) if sep else (item, item)


def train_prefix(tier: str, split: str) -> str:
    """The first part of a defense-aware partition's name on `split`: the tier on ``test`` (as always),
    ``<tier>-<split>`` elsewhere. The ``threat`` metadata is one entry per partition name for the whole table,
    so a train partition must not share its name with the test partition of the same attack."""
    return tier if split == "test" else f"{tier}-{split}"


def calibration_holdout(pipelines: Mapping[str, PipelineSpec]) -> float:
    """The largest share of samples any of these pipelines' detectors holds out to calibrate its threshold
    (`Detector.calibration_fraction`; the samples are `logitguard.tables.holdout_mask(ids, share, seed=0)`,
    a hash of the sample id, the same in any table)."""
    share = 0.0
    for spec in pipelines.values():
        detector = None if spec.detector is None else spec.build().detector
        share = max(share, float(getattr(detector, "calibration_fraction", 0.0)))
    return share


def export_through(
    model: ImageClassifier,
    data: ImageSet,
    pipelines: Mapping[str, PipelineSpec],
    *,
    out: str | Path,
    tier: str = "adaptive",
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    samples: int | None = 1000,
    noise: NoiseRecipe | None,
    attack_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    metadata: Mapping[str, Any] | None = None,  # table metadata to write (e.g. the joined table's own)
    target_names: Mapping[str, str] | None = None,
    defense_files: Mapping[str, Mapping[str, str]] | None = None,
    features: bool = False,
    insen: bool = False,
    judge_draws: int = 5,
    judges: Mapping[str, PipelineSpec] | None = None,
    after: Sequence[str] = (),
    focus: tuple[str, PipelineSpec, Sequence[str]] | None = None,
    prefix: str | None = None,
    threat_extra: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ExportReport:
    """Attack every pipeline in `pipelines` at every budget with every attack; one partition each.

    Samples are the first `samples` of the split's seeded selection (`select_samples`), so they are the
    same samples as the oblivious partitions of an export with the same seed, less those whose clean row in
    `out` the model gets wrong (no robustness figure counts them). `attack_params` apply to
    every attack (``steps``, ``restarts``, ``eot``, …). `target_names` maps a pipeline key to the name
    recorded as its target (surrogate copies are named after the real pipeline they stand in for);
    `defense_files` overrides the fingerprints recorded (default: the files of each spec). `features` and
    `insen` add those columns (as `export` does), so the partitions join a table that has them.
    `judge_draws` R: noise draws each partition through a noise-reading pipeline is judged on (see module),
    by `judges` (pipeline key -> the real pipeline's spec; default `pipelines` themselves).
    An attack item ``ALIAS=ATTACK`` (`split_alias`) runs ATTACK under the partition name ALIAS.
    `after` (attack names or aliases, e.g. ``["suite"]``): a continuation, in the manner of AutoAttack across runs: each
    pipeline x budget is attacked only on the samples that its partitions of those attacks in `out` (judge
    draws included) left unbroken, judged by the core pipeline, and the threat entry names the partitions.
    `focus` ``(pipeline, its spec, attacks)``, e.g. the bare model ``("none", spec, ["suite"])``: attack only the
    samples that pipeline's partitions of those attacks (same tier and budget, judge draws included) broke; where
    the bare model holds, a gated pipeline that only answers its label or abstains holds too, so those are the
    samples its gain rests on; the threat entry names the ``focus`` partitions. A continuation's partition holds
    only the samples it attacked (the core reads it as a subset: `subset_partitions`); one with nothing left
    to attack is not written (`ExportReport.settled` names it).
    Partitions already in `out` are skipped (refused when made with other settings); the run's new ones are
    added to `out` together at the end, and an interrupted run resumes from what it staged (`ExportStage`).

    On another split than ``test`` (`data` is the train split: the attacker's view of what the defender learnt
    from, for an adversarial fit) partitions are named ``<tier>-<split>.…`` (`train_prefix`; `prefix`
    overrides the first part of every name), their threat entry records ``split`` and ``calibration_holdout``,
    the samples are the first `samples` of the split's seeded selection *outside* the pipelines' detector
    calibration hold-out (`calibration_holdout`: the clean rows their thresholds are set on are never
    attacked), and every chosen sample must have a clean row in `out`'s split (refused otherwise).
    `threat_extra` is added to every threat entry (an adversarial fit's ``round``).
    """
    if tier not in TIERS:
        raise ProducerError(f"tier must be one of {TIERS}, got {tier!r}")
    unknown = sorted({attack for _, attack in map(split_alias, attacks)} - set(DEFENSE_ATTACK_NAMES))
    if unknown:
        raise ProducerError(f"unknown defense-aware attack(s) {unknown}; known: {list(DEFENSE_ATTACK_NAMES)}")
    holdout = 0.0 if data.split == "test" else calibration_holdout(pipelines)
    rows, base_meta = run_selection(data, budgets=budgets, judge_draws=judge_draws, samples=samples, seed=seed,
                                    noise=noise, metadata=metadata, holdout=holdout)
    out, device = Path(out), torch.device(device)
    rows = _right_when_clean(out, data.split, rows, samples, seed)
    extra = dict(threat_extra or {})
    if data.split != "test":
        extra = {"split": data.split, "calibration_holdout": holdout, **extra}
    first = prefix or train_prefix(tier, data.split)
    model = model.to(device).eval()
    plan = []  # (partition name, attacker, metadata): everything is built and checked before any attack
    settled = []  # continuations with no sample left to attack
    for key, spec in pipelines.items():
        target = (target_names or {}).get(key, key)
        mirror = load_pipeline_mirror(spec)
        files = dict((defense_files or {}).get(key) or spec.fingerprints())
        bare = spec.detector is None and spec.corrector is None
        for eps in budgets:
            for alias, attack in (split_alias(a) for a in attacks):
                if bare and attack not in BARE_ATTACKS:
                    continue
                name = partition_name(first, target, alias, eps)
                try:
                    attacker = make_attack(attack, model, defense=mirror, noise=noise, eps=eps,
                                           batch_size=batch_size, device=device, **dict(attack_params or {}))
                except (TypeError, ValueError) as exc:
                    raise ProducerError(f"attack {attack}: {exc}") from None
                threat = {"model": tier, "target": target, "attack": attack, "eps": eps, "defense_files": files,
                          **extra}
                chosen = np.ones(len(rows), bool)  # a continuation attacks (and writes) only some samples
                if after:
                    earlier = [partition_name(first, target, a, eps) for a in after]
                    threat["after"] = earlier
                    chosen &= ~broken_by_partitions(out, data.split, earlier, rows, (judges or pipelines)[key])
                if focus:
                    other, other_spec, other_attacks = focus
                    focused = [partition_name(first, other, a, eps) for a in other_attacks]
                    threat["focus"] = focused
                    chosen &= broken_by_partitions(out, data.split, focused, rows, other_spec)
                if not chosen.any():
                    settled.append(name)
                    continue
                draws = judge_draws if mirror.needs_noise else 1
                if draws > 1:
                    threat["judge_draws"] = draws
                if hasattr(attacker, "record"):
                    threat["sequence"] = list(attacker.names)
                meta = {**base_meta, "attacks": {name: {**attacker.params(), "attack": attack}},
                        "threat": {name: threat}}
                judge = (judges or pipelines)[key] if draws > 1 or hasattr(attacker, "record") else None
                plan.append(Planned(name, attacker, meta, draws, judge, suite_record(attacker, name),
                                    rows=rows[chosen]))
    report = run_plan(plan, out=out, tier=tier, data=data, seed=seed, model=model, noise=noise,
                      features=features, insen=insen, batch_size=batch_size, device=device, progress=progress)
    report.settled = settled
    return report


def run_selection(data: ImageSet, *, budgets: Sequence[float], judge_draws: int, samples: int | None, seed: int,
                  noise: NoiseRecipe | None, metadata: Mapping[str, Any] | None,
                  holdout: float = 0.0) -> tuple[np.ndarray, dict[str, Any]]:
    """What every defense-aware export checks and shares: the budgets and judge draws (refused when out of
    range), the sorted sample ids (the first `samples` of the split's seeded selection, the oblivious
    partitions' samples; with `holdout` > 0, of those outside ``holdout_mask(ids, holdout, seed=0)``, a
    detector's calibration hold-out) and the table metadata every partition carries."""
    if judge_draws < 1:
        raise ProducerError(f"judge_draws must be >= 1, got {judge_draws!r}")
    if not budgets or any(not 0 < eps <= 1 for eps in budgets):
        raise ProducerError(f"budgets must be in (0, 1] (pixels in [0, 1]), got {list(budgets)}")
    if holdout > 0:
        order = select_samples(len(data), None, seed, data.split)
        order = order[~holdout_mask(order, holdout, seed=0)]  # seed 0: `Detector.fit`'s hold-out
        rows = np.sort(order if samples is None else order[:samples])
    else:
        rows = np.sort(select_samples(len(data), samples, seed, data.split))
    meta = {"num_classes": len(data.class_names), "class_names": list(data.class_names),
            "noise": None if noise is None else {**noise.to_metadata(), "seed": seed}, "seed": seed,
            **dict(metadata or {})}
    return rows, meta


def _right_when_clean(out: Path, split: str, rows: np.ndarray, samples: int | None, seed: int) -> np.ndarray:
    """`rows` less the samples the model gets wrong on their clean row in the table `out`: a robustness figure
    counts only the samples the bare model gets right when clean, so attacking the others would cost compute
    and rows for nothing. On the test split a sample without a clean row there is kept (and a table without
    clean rows keeps all); on another split it is refused: its attacked rows would pair with nothing, and the
    defender never saw it (another --seed, or more samples than the table's split holds)."""
    from logitguard.tables import read_table

    try:
        clean = read_table(out, split=split, attacks=["clean"], columns=[])
    except LogitguardError as exc:
        if split == "test":
            return rows
        raise ProducerError(f"{out}: cannot read the clean rows of split {split!r} ({exc})") from None
    missing = rows[~np.isin(rows, clean.sample_id)]
    if split != "test" and len(missing):
        raise ProducerError(f"{len(missing)} of the {len(rows)} {split} samples chosen (seed {seed}, {samples} "
                            f"samples outside the detector's calibration hold-out) have no clean row in {out}'s "
                            f"{split} split ({len(clean)} samples), e.g. sample {int(missing[0])}: attack fewer "
                            f"samples or use the seed the table was exported with")
    wrong = clean.sample_id[clean.logits.argmax(axis=1) != clean.labels]
    return rows[~np.isin(rows, wrong)]


@dataclass
class Planned:
    """One partition to export: its attacker and metadata, its judge draws and the core pipeline that judges
    them (None: no judging), ``finish(table, broken) -> table``, which adds the attack's own results (the
    suite's record, a query attack's counts) to its threat entry once it has run, `recognise`, and `rows`, the
    sample ids it attacks (a continuation's are fewer than the run's)."""

    name: str
    attacker: Any
    meta: dict[str, Any]
    draws: int = 1
    judge: PipelineSpec | None = None
    finish: Callable[[LogitTable, np.ndarray | None], LogitTable] = lambda table, broken: table
    # recognise(meta, [finished file, staged file]) -> the metadata a finished run of these settings wrote
    # (a run's results are not settings: a rerun must still recognise the partition)
    recognise: Callable[[dict[str, Any], list[Path]], dict[str, Any]] | None = None
    rows: np.ndarray = field(kw_only=True)


def run_plan(plan: Sequence[Planned], *, out: Path, tier: str, data: ImageSet, seed: int,
             features: bool, insen: bool, **export: Any) -> ExportReport:
    """Export every planned partition not yet in `out` (refused when made with other settings) with its judge
    draws, staged under `tier` and added to `out` together at the end; an interrupted run resumes from what
    it staged (`ExportStage`). `export`: the rest of `export_partition`'s arguments."""
    report = ExportReport()
    with ExportStage(out, tier) as stage:
        todo = []
        for item in plan:
            rel = partition_rel(data.split, item.name)
            meta = item.meta if item.recognise is None else item.recognise(item.meta, [out / rel, stage.stage.path / rel])
            state = stage.classify(rel, meta, item.name, item.rows, features=features, insen=insen)
            if state == "done":
                report.skipped.append(out / rel)
            elif state == "todo":
                todo.append(item)
            else:  # staged: so are the judge draws it got to
                stage.files += staged_draws(stage, data.split, item.name, item.draws)
        for item in todo:
            started = time.perf_counter()
            export_judged(stage, name=item.name, attacker=item.attacker, meta=item.meta, rows=item.rows,
                          seed=seed, draws=item.draws, judge=item.judge, finish=item.finish, data=data,
                          features=features, insen=insen, **export)
            report.timings.append({"split": data.split, "attack": item.name, "rows": len(item.rows),
                                   "seconds": time.perf_counter() - started})
        report.written = stage.commit()
    return report


def export_surrogate(
    model: ImageClassifier,
    train: ImageSet,
    test: ImageSet,
    pipelines: Mapping[str, PipelineSpec],
    *,
    out: str | Path,
    workdir: str | Path,
    defender_ids: np.ndarray,
    attacker_samples: int = 5000,
    attacker_attacks: Sequence[str] = ("clean", "fgsm", "bim", "pgd", "mim", "deepfool", "cw"),
    attacker_params: Mapping[str, Mapping[str, Any]] | None = None,
    noise: NoiseRecipe,
    seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **through: Any,
) -> ExportReport:
    """The surrogate tier: an own table from unused training samples, an own copy of the shipped
    pipelines, attacks through the copy (see module). `defender_ids` are the training sample ids the
    defender used (never used by the attacker). The attacker's table and copy stay in `workdir`."""
    from logitguard.defenses.shipped import fit_shipped
    from logitguard.tables import read_table

    workdir = Path(workdir)
    order = select_samples(len(train), None, seed + 1, train.split)
    rows = np.sort(order[~np.isin(order, defender_ids)][:attacker_samples])
    if len(rows) < attacker_samples:
        raise ProducerError(f"only {len(rows)} training samples are left for the attacker; need {attacker_samples}")
    table_dir = workdir / "attacker-table"
    meta = {"num_classes": len(train.class_names), "class_names": list(train.class_names),
            "noise": {**noise.to_metadata(), "seed": seed}, "seed": seed, "attacks": {}}
    with ExportStage(table_dir, "attacker") as stage:
        for attack in attacker_attacks:
            rel = f"split={train.split}/attack={attack}/shard-0-of-1.parquet"
            if stage.classify(rel, meta, attack, rows) != "todo":
                continue
            attacker = None if attack == "clean" else make_attack(
                attack, model, batch_size=batch_size, device=device, **dict((attacker_params or {}).get(attack, {})))
            part = export_partition(model, train, rows, attack=attack, attacker=attacker, noise=noise,
                                     features=False, generator_seed=[seed + 1, zlib.crc32(attack.encode()), 0],
                                     batch_size=batch_size, device=torch.device(device), metadata=meta,
                                     progress=progress)
            stage.write(rel, part)
        stage.commit()
    copy_manifest = workdir / "copy" / "defenses.json"
    if not copy_manifest.exists():
        fit_shipped(read_table(table_dir), copy_manifest.parent, seed=seed + 1)
    copies = load_pipelines(copy_manifest)
    missing = sorted(set(pipelines) - set(copies))
    if missing:
        raise ProducerError(f"the shipped recipe has no pipeline(s) {missing} to copy")
    chosen = {name: copies[name] for name in pipelines if pipelines[name].detector or pipelines[name].corrector}
    return export_through(model, test, chosen, out=out, tier="surrogate", noise=noise, seed=seed,
                          batch_size=batch_size, device=device, progress=progress, judges=pipelines, **through)
