"""Adversarial fitting of a detector: attack it on the train split, learn from what got through, repeat.

Round r = 1..R attacks the current files (round 0: the starting manifest) with the defense-aware attacks on
the *train* split (`export_through` on the train `ImageSet`: the samples are the first `samples` of the split's
seeded selection outside the detectors' calibration hold-out, the same samples every round), writing
partitions ``adaptive-round<r>.<pipeline>.<attack>.e<255ε>`` (threat entry: ``split``: train, ``round``: r and
the usual target, budget, defense files and judge draws) into the table. Its attack success rate is the share
of those samples (the ones the model gets right when clean) that the round's pipeline, in the core's NumPy
form, answers wrongly without abstaining on some judge draw (`broken_by_partitions`). Then each pipeline's
detector is refitted, of the same kind and with the same parameters (seed included), on the train split from
the original attacks plus every round's partitions so far (`logitguard.defenses.pipelines.refit_detectors`;
correctors are kept): the learned detectors take as positives only the rows whose attack succeeded against
the model (the model's label wrong, its clean label right: `Detector.successful_attacks_only`), and
recalibrate their threshold to the target FPR on the clean rows of their calibration hold-out, which no
round attacks. Round r's manifest is ``workdir/round-<r>/defenses.json``; its ``provenance``
(`manifest_provenance`) records every round so far. The loop stops early when a round's success rate is not
lower than the previous round's by more than `tolerance`.

What this measures is the attacker's success on the samples the detector learns from: the fitted files
must be attacked afresh on the test split (``attack-defenses``) before any figure is claimed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitguard.defenses.pipelines import PipelineSpec, load_pipelines, refit_detectors, save_pipelines
from logitguard.errors import LogitguardError
from logitguard.tables import CLEAN, read_table, table_columns
from logitguard.tables.threat import DEFAULT_BUDGETS, threat_of

from ..data.datasets import ImageSet
from ..data.noise import NoiseRecipe
from ..errors import ProducerError
from ..models.classifiers import ImageClassifier
from .export import export_through, partition_name
from .judging import broken_by_partitions

DEFAULT_ATTACKS = ("suite",)
DEFAULT_TOLERANCE = 0.01


def round_prefix(r: int) -> str:
    """The first part of round `r`'s partition names: ``adaptive-round2``."""
    return f"adaptive-round{r}"


@dataclass
class Round:
    """One round: the files it attacked, what the attack achieved, and the files refitted after it."""

    round: int
    attacked: str  # the manifest attacked (round 0: the starting one)
    partitions: list[str]  # the round's partitions (draw 0; judge draws are ``<name>.r<k>``)
    success: dict[str, float]  # "<pipeline> e<255ε>" -> share of the selected samples broken
    samples: int  # selected attacked samples (the model right on their clean row), per pipeline x budget
    success_rate: float  # the mean of `success`: what the stopping rule compares
    manifest: str  # the manifest refitted after the round
    fit_attacks: list[str]  # the partitions the refit learned from
    threshold: dict[str, float]  # per refitted detector file
    calibration_fpr: dict[str, float]  # achieved on its calibration rows
    heldout_fpr: dict[str, float | None]  # on the table's test clean rows (never fitted on)
    seconds: dict[str, float] = field(default_factory=dict)  # attack, fit


@dataclass
class AdversarialFit:
    """What `fit_adversarially` did: every round, the final manifest and why it stopped."""

    rounds: list[Round]
    manifest: Path
    stopped: str
    start: dict[str, Any]  # the starting manifest's detector files: threshold and held-out FPR


def fit_adversarially(
    model: ImageClassifier,
    train: ImageSet,
    *,
    table: str | Path,
    defenses: str | Path,
    workdir: str | Path,
    pipelines: Sequence[str] = ("ln-reject",),
    rounds: int = 3,
    samples: int = 1000,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    attack_params: Mapping[str, Any] | None = None,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    fit_attacks: Sequence[str] | None = None,
    judge_draws: int = 5,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_round: Any = None,
) -> AdversarialFit:
    """Fit `pipelines` of the manifest `defenses` adversarially in up to `rounds` rounds (see module).

    `table`: the table the defenses were fitted on (its train split; round partitions are added to it).
    `fit_attacks`: the original attacks every refit learns from (default: the train split's oblivious and
    transfer attacks, as `logitguard fit-pipelines`). `samples`, `attacks`, `attack_params`, `budgets`,
    `judge_draws`, `batch_size`, `device`: as `export_through`. `seed` seeds the sample selection and the
    attacks' noise (each detector's own parameters seed its refits). `on_round(round)` is called after each
    round (printing).
    """
    if rounds < 1:
        raise ProducerError(f"rounds must be at least 1, got {rounds}")
    if not 0 <= tolerance < 1:
        raise ProducerError(f"tolerance must be in [0, 1), got {tolerance}")
    if train.split != "train":
        raise ProducerError(f"adversarial fitting attacks the train split, got split {train.split!r}")
    table, workdir = Path(table), Path(workdir)
    earlier = sorted(workdir.glob("round-*"))
    if earlier:
        raise ProducerError(f"{workdir} holds an earlier fit ({earlier[0].name}); use another --workdir")
    names = list(dict.fromkeys(pipelines))
    specs = _chosen(load_pipelines(defenses), names, defenses)
    clean = read_table(table, split="train", attacks=[CLEAN])
    meta = {k: v for k, v in clean.metadata.items() if k not in ("attacks", "threat", "schema_version")}
    noise = NoiseRecipe.from_metadata(meta.get("noise"))
    columns = set(table_columns(table))
    if fit_attacks is None:
        every = read_table(table, split="train", columns=[]).attacks
        fit_attacks = [a for a in every if a != CLEAN and threat_of(clean.metadata, a)["model"] in ("oblivious", "transfer")]
    fit_attacks = list(fit_attacks)
    heldout = _heldout(table)
    settings = {"kind": "adversarial-fit", "table": str(table), "start": {"manifest": str(defenses),
                "files": {n: specs[n].fingerprints() for n in names}}, "pipelines": names, "attacks": list(attacks),
                "attack_params": dict(attack_params or {}), "budgets": [float(e) for e in budgets],
                "samples": int(samples), "split": "train", "seed": int(seed), "judge_draws": int(judge_draws),
                "tolerance": float(tolerance), "max_rounds": int(rounds), "fit_attacks": fit_attacks}
    start = _detectors(specs, heldout)
    done: list[Round] = []
    positives: list[str] = []
    current, attacked, stopped = specs, str(defenses), f"ran all {rounds} round(s)"
    for r in range(1, rounds + 1):
        began = time.perf_counter()
        export_through(model, train, current, out=table, attacks=attacks, budgets=budgets, samples=samples,
                       noise=noise, attack_params=attack_params, seed=seed, batch_size=batch_size, device=device,
                       metadata=meta, judge_draws=judge_draws, features="features" in columns,
                       insen="insen" in columns, prefix=round_prefix(r), threat_extra={"round": r}, progress=progress)
        attack_seconds = time.perf_counter() - began
        parts = [partition_name(round_prefix(r), n, a, e) for n in names for e in budgets for a in attacks]
        success, selected = _success(table, current, names, attacks, budgets, r, clean)
        rate = float(np.mean(list(success.values())))
        positives += parts
        began = time.perf_counter()
        out = workdir / f"round-{r}"
        learn = [*fit_attacks, *positives]
        manifest = refit_detectors(current, read_table(table, split="train", attacks=[CLEAN, *learn]), out,
                                   attacks=learn)
        refit = _chosen(load_pipelines(manifest), names, manifest)
        figures = _detectors(refit, heldout)
        done.append(Round(round=r, attacked=attacked, partitions=parts, success=success, samples=selected,
                          success_rate=rate, manifest=str(manifest), fit_attacks=learn,
                          threshold=figures["threshold"], calibration_fpr=figures["calibration_fpr"],
                          heldout_fpr=figures["heldout_fpr"],
                          seconds={"attack": round(attack_seconds, 3), "fit": round(time.perf_counter() - began, 3)}))
        stop = r > 1 and rate > done[-2].success_rate - tolerance
        if stop:
            stopped = (f"round {r}'s success rate {rate:.3f} is not below round {r - 1}'s "
                       f"{done[-2].success_rate:.3f} by more than {tolerance}")
        # the manifest records every round so far (rewritten with this round's figures, which need its files)
        save_pipelines(manifest, refit, overwrite=True, provenance=_plain({
            **settings, "start": {**settings["start"], **start}, "rounds": [asdict(x) for x in done],
            "stopped": stopped if stop or r == rounds else None}))
        if on_round is not None:
            on_round(done[-1])
        if stop:
            break
        current, attacked = refit, str(manifest)
    return AdversarialFit(rounds=done, manifest=Path(done[-1].manifest), stopped=stopped, start=start)


def _chosen(specs: Mapping[str, PipelineSpec], names: Sequence[str], where: Any) -> dict[str, PipelineSpec]:
    """The pipelines `names` of a manifest, each with a detector (what a round refits)."""
    if not names:
        raise ProducerError("name at least one pipeline to fit adversarially")
    missing = sorted(set(names) - set(specs))
    if missing:
        raise ProducerError(f"no pipeline(s) {missing} in {where}; it has {sorted(specs)}")
    for name in names:
        if specs[name].detector is None:
            with_detector = [n for n, spec in specs.items() if spec.detector is not None]
            raise ProducerError(f"pipeline {name!r} has no detector to refit; choose from "
                                f"{', '.join(with_detector) or 'none in this manifest'}")
    return {name: specs[name] for name in names}


def _heldout(table: Path) -> Any:
    """The table's test clean rows (never fitted on), where it has them: the clean FPR each round reports."""
    try:
        return read_table(table, split="test", attacks=[CLEAN])
    except LogitguardError:  # a table with no test split: no held-out figure
        return None


def _detectors(specs: Mapping[str, PipelineSpec], heldout: Any) -> dict[str, dict[str, Any]]:
    """Per detector file of `specs`: its threshold, FPR on its calibration rows and on `heldout`'s clean rows."""
    out: dict[str, dict[str, Any]] = {"threshold": {}, "calibration_fpr": {}, "heldout_fpr": {}}
    for spec in specs.values():
        name = spec.detector.name
        if name in out["threshold"]:
            continue
        detector = spec.build().detector
        out["threshold"][name] = float(detector.threshold_)
        out["calibration_fpr"][name] = float(detector.achieved_fpr_)
        out["heldout_fpr"][name] = None if heldout is None else float(detector.flag_table(heldout).mean())
    return out


def _success(table: Path, specs: Mapping[str, PipelineSpec], names: Sequence[str], attacks: Sequence[str],
             budgets: Sequence[float], r: int, clean: Any) -> tuple[dict[str, float], int]:
    """Per pipeline x budget, the share of round `r`'s attacked samples (those the model gets right when
    clean) that the pipeline answers wrongly without abstaining on some partition of the round or judge draw."""
    right = clean.sample_id[clean.logits.argmax(1) == clean.labels]
    out, selected = {}, 0
    for name in names:
        for eps in budgets:
            parts = [partition_name(round_prefix(r), name, a, eps) for a in attacks]
            rows = np.sort(read_table(table, split="train", attacks=[parts[0]], columns=[]).sample_id)
            rows = rows[np.isin(rows, right)]
            broken = broken_by_partitions(table, "train", parts, rows, specs[name])
            out[f"{name} e{round(eps * 255):g}"] = float(broken.mean()) if len(rows) else 0.0
            selected = len(rows)
    return out, selected


def _plain(value: Any) -> Any:
    """JSON-ready: NumPy scalars to Python numbers, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def format_rounds(fit: AdversarialFit) -> str:
    """The per-round table: success rate of the round's attack on the files it attacked, then the refitted
    detector's threshold and clean FPR on its calibration rows and on held-out (test) clean rows."""
    lines = [f"{'round':>5}  {'attacked':<28} {'samples':>7}  {'success':>7}  {'detector':<20} {'threshold':>9}  "
             f"{'calib FPR':>9}  {'held-out FPR':>12}"]

    def fpr(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    for file, threshold in fit.start["threshold"].items():
        lines.append(f"{0:>5}  {'(start)':<28} {'':>7}  {'':>7}  {file:<20} {threshold:>9.4f}  "
                     f"{fpr(fit.start['calibration_fpr'][file]):>9}  {fpr(fit.start['heldout_fpr'][file]):>12}")
    for x in fit.rounds:
        attacked = Path(x.attacked).parent.name + "/" + Path(x.attacked).name
        for file, threshold in x.threshold.items():
            lines.append(f"{x.round:>5}  {attacked[-28:]:<28} {x.samples:>7}  {x.success_rate:>7.2%}  {file:<20} "
                         f"{threshold:>9.4f}  {fpr(x.calibration_fpr[file]):>9}  {fpr(x.heldout_fpr[file]):>12}")
    lines.append(f"stopped: {fit.stopped}; final manifest {fit.manifest}")
    return "\n".join(lines)


__all__ = ["AdversarialFit", "DEFAULT_ATTACKS", "Round", "fit_adversarially", "format_rounds", "round_prefix"]
