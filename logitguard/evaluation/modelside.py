"""Model-side and logit-side defenses side by side (seeds 001–004 beside the logit pipelines).

Each compared model (one training objective: CE, RCE, PGD-AT, AT+ALP, JumpReLU, …) has its own logit table
(train split: what the logit pipelines and the feature detectors are fitted on; test split: clean, oblivious,
transfer, surrogate and adaptive partitions) and its own fitted pipelines (`logitguard fit-pipelines`). For
each model `compare_models` measures

* clean accuracy and, per threat model and budget, per-sample worst-case robust accuracy of the bare model
  and of the recommended logit pipeline (`logitguard.evaluation.threat.threat_model_table`, one definition for both);
* detector AUROCs in seed 001's Table 2 setting: positives are attacked rows of samples the model gets right
  clean and wrong attacked, negatives their clean rows; detectors ``msp`` (confidence), ``nonme``,
  ``kdensity`` (needs ``features``), ``insen`` (needs ``insen``) and an image-space system's
  ``external_score`` (GRED) where the table has it.

Torch-free: it reads tables and saved defenses only. `format_model_side` renders the report section.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LogitguardError
from .metrics import auroc, successful_attack
from ..tables import CLEAN, LogitTable, pair_rows, read_table
from .threat import threat_model_table, to_records
from ..tables.threat import DEFAULT_BUDGETS, attack_eps, threat_of

RECOMMENDED_PIPELINE = "ln-reject"  # the pipeline that did no harm under adaptive attack (docs/threat-models.md)
DETECTORS = ("msp", "nonme", "kdensity", "insen", "external")
_NEEDS = {"kdensity": "features", "insen": "insen", "external": "external_score"}


def compare_models(
    models: Mapping[str, tuple[str | os.PathLike, str | os.PathLike | None]],
    *,
    pipeline: str = RECOMMENDED_PIPELINE,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
) -> dict[str, Any]:
    """``{name: (table, manifest)}`` → a JSON-ready dict: ``models`` (one entry per model: what it is,
    clean accuracy), ``threat`` (records: model, pipeline, threat_model, eps, robust_accuracy, …),
    ``detection`` (records: model, detector, attack, threat_model, eps, auroc, positives) and ``external``
    (an image-space system's rectified labels, where the table has them: `external_accuracy`).

    A model without a manifest (None) gives detection figures only; its table needs no train split then.
    """
    from ..defenses.detectors import load_detector
    from ..defenses.pipelines import load_pipelines

    if not models:
        raise LogitguardError("give at least one model (NAME=TABLE:MANIFEST)")
    described, threat, detection, external = [], [], [], []
    for name, (table_path, manifest) in models.items():
        table = read_table(table_path)
        if "test" not in table.splits or (manifest is not None and "train" not in table.splits):
            raise LogitguardError(f"{table_path}: a compared model's table needs a test split (and a train split "
                                  f"to fit on when a manifest is given), it has {table.splits}")
        described.append(_describe(name, table))
        saved = {}
        if manifest is not None:
            specs = load_pipelines(manifest)
            if pipeline not in specs:
                raise LogitguardError(f"{manifest} has no pipeline {pipeline!r}; it has {sorted(specs)}")
            # A saved detector of a compared kind (the kdensity one the adaptive attack aimed at) is used as is.
            saved = {n: load_detector(spec.detector) for n, spec in specs.items()
                     if n in DETECTORS and spec.detector is not None}
            frame = threat_model_table(table.select(split="test"), {pipeline: specs[pipeline].build()}, budgets=budgets)
            frame.insert(0, "model", name)
            threat += to_records(frame.assign(attacks=frame["attacks"].map(list)))
        detection += detection_aurocs(table, name, saved)
        external += external_accuracy(table, name)
    return {"pipeline": pipeline, "budgets": list(budgets), "models": described, "threat": threat,
            "detection": detection, "external": external}


def _describe(name: str, table: LogitTable) -> dict[str, Any]:
    model = dict(table.metadata.get("model") or {})
    train = dict(model.get("train") or {})
    test = table.select(split="test", attacks=CLEAN)
    objective = train.get("objective") or {"name": "ce"}
    activation = model.get("activation") or {"name": "relu"}
    activation = ":".join(str(activation[k]) for k in ("name", "k") if k in activation) + (
        ":random" if activation.get("random") else "")
    return {"model": name, "objective": objective["name"] if isinstance(objective, dict) else str(objective),
            "activation": activation,
            "train": train, "test_accuracy_full": model.get("test_accuracy"),
            "train_seconds": model.get("train_seconds", train.get("seconds")),
            "clean_accuracy": float((test.logits.argmax(1) == test.labels).mean()), "test_samples": len(test)}


def detection_aurocs(table: LogitTable, name: str = "", saved: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """AUROC per detector x test attack (seed 001's Table 2 setting; see the module). Detectors that need a
    column the table lacks are left out; `saved` detectors (by kind) are used as they are, the others fitted
    on the train split with their defaults."""
    from ..defenses.detectors import KINDS, make_detector

    test = table.select(split="test")
    train = table.select(split="train") if "train" in table.splits else None
    scorers = {}
    for detector in DETECTORS:
        column = _NEEDS.get(detector)
        if column is not None and column not in table.columns:
            continue
        if detector == "external":
            scorers[detector] = lambda t: t.column("external_score")
            continue
        if detector in (saved or {}):
            scorers[detector] = saved[detector].score_table
            continue
        if detector not in KINDS or (train is None and detector in _NEEDS):
            continue  # the learned detectors need a train split
        fit_on = test if train is None else train  # the fixed scores only need clean rows to calibrate on
        fitted = make_detector(detector).fit_table(fit_on, attacks=[a for a in fit_on.attacks if a != CLEAN] or None)
        scorers[detector] = fitted.score_table
    scores = {detector: np.asarray(score(test), dtype=np.float64) for detector, score in scorers.items()}
    records = []
    for attack, clean_rows, attacked_rows in _attack_pairs(test):
        labels = test.labels[clean_rows]
        fooled = successful_attack(test.logits[clean_rows].argmax(1), test.logits[attacked_rows].argmax(1), labels)
        if fooled.sum() < 5:
            continue  # too few successful attacks for an AUROC
        negatives, positives = clean_rows[fooled], attacked_rows[fooled]
        entry = threat_of(test.metadata, attack)
        for detector, score in scores.items():
            value = auroc(score[negatives], score[positives])
            records.append({"model": name, "detector": detector, "attack": attack, "threat_model": entry["model"],
                            "target": entry.get("target"), "eps": attack_eps(test.metadata, attack),
                            "auroc": None if np.isnan(value) else float(value), "positives": int(fooled.sum())})
    return records


def external_accuracy(table: LogitTable, name: str = "") -> list[dict[str, Any]]:
    """Per test attack, for a table with an image-space system's columns (``external_score``,
    ``external_label``; e.g. GRED): accuracy of the system's rectified label on every attacked row, and of
    its pipeline (the rectified label where ``external_score`` > 0.5, else the model's) on attacked and
    clean rows. Empty without those columns."""
    if "external_label" not in table.columns:
        return []
    test = table.select(split="test")
    rectified, score = test.column("external_label"), test.column("external_score")
    pipeline = np.where(score > 0.5, rectified, test.logits.argmax(1))
    records = []
    for attack, clean_rows, attacked_rows in _attack_pairs(test):
        labels = test.labels[attacked_rows]
        records.append({
            "model": name, "attack": attack, "threat_model": threat_of(test.metadata, attack)["model"],
            "eps": attack_eps(test.metadata, attack), "rows": len(attacked_rows),
            "model_accuracy": float((test.logits[attacked_rows].argmax(1) == labels).mean()),
            "rectified_accuracy": float((rectified[attacked_rows] == labels).mean()),
            "pipeline_accuracy": float((pipeline[attacked_rows] == labels).mean()),
            "pipeline_clean_accuracy": float((pipeline[clean_rows] == test.labels[clean_rows]).mean()),
            "detection_rate": float((score[attacked_rows] > 0.5).mean()),
            "false_positive_rate": float((score[clean_rows] > 0.5).mean())})
    return records


def _attack_pairs(test: LogitTable) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(attack, clean rows, attacked rows) for every attacked partition of `test`, aligned by sample."""
    for attack in test.attacks:
        if attack != CLEAN:
            yield (attack, *pair_rows(test, attack))


def parse_model_specs(items: Sequence[str]) -> dict[str, tuple[Path, Path | None]]:
    """``["ce=work/ce-table:work/ce-defenses/defenses.json", "gred=work/gred-table", …]`` →
    ``{"ce": (table, manifest), "gred": (table, None)}`` (no manifest: detection figures only)."""
    out: dict[str, tuple[Path, Path | None]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        table, colon, manifest = rest.rpartition(":") if ":" in rest else (rest, "", None)
        if not sep or not name or not table or (colon and not manifest):
            raise LogitguardError(f"model {item!r} must look like NAME=TABLE:MANIFEST or NAME=TABLE")
        if name in out:
            raise LogitguardError(f"model name {name!r} given twice")
        out[name] = (Path(table), None if manifest is None else Path(manifest))
    return out
