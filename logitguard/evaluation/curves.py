"""Robustness curves: accuracy against perturbation size for each swept attack, without and with defenses.

A *sweep* is a set of attack partitions the producer wrote with ``export --sweep ATTACK.PARAM=V1,V2,…``:
each records in the table metadata ``attacks[partition]["sweep"] == {"name": "pgd.eps", "attack": "pgd",
"param": "eps", "value": 0.0314}``, so the sweep is found without parsing partition names. A curve has one
point per value plus the clean rows as the value-0 point, all over the same samples (those with a row in
every partition of the sweep), with for each point:

- the bare model's accuracy (``none``) and each defense's, counted as
  `logitguard.evaluation.evaluate.evaluation_records` counts them for the whole project (docs/threat-models.md): on attacked rows a rejected row is defended
  (``robust_accuracy``), on clean rows a rejected row is an error (``clean_accuracy``);
- each detector's detection rate at its calibrated threshold, as `logitguard.evaluation.evaluate.detection_records`
  defines it: the share of *successful* attacks flagged, and at the clean point the share of clean rows
  flagged (its false-positive rate);
- the swept value and the measured mean L-inf and L2 size of the rows (the ``linf`` / ``l2`` columns).

The threat model is the partitions' own (``threat`` metadata): an export's sweeps are *oblivious* (aimed at
the model, not at the defenses), or *transfer* with ``--substitute``. One curve per (sweep, threat model).
Attacks aimed at a defense (surrogate, query, adaptive partitions whose ``target`` is one of the defenses) are
not sweeps but run at a few budgets: where the table has them, ``tiers`` gives each defense's per-sample worst
case per defense-aware tier at those budgets (`threat_model_table`), drawn beside the sweeps with their tier
named, so a curve never shows only the attackers who ignore the defense.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..defenses.gated import GatedDefense
from ..defenses.decision import Decision
from ..errors import LogitguardError
from ..tables import CLEAN, LogitTable, RowKeys, TableSource, read_keys, read_table, require_one_split, table_columns
from ..tables.threat import NO_DEFENSE, attack_eps, threat_of

AIMED_TIERS = ("surrogate", "query", "adaptive")  # tiers whose attacks aim at a named defense

CURVE_X = ("param", "eps", "linf", "l2")
THREAT_TEXT = {
    "oblivious": "oblivious: attacks on the model, not aimed at any defense",
    "transfer": "transfer: attacks computed on a substitute model, applied to the target",
}

__all__ = ["CURVE_X", "SweptAttack", "curve_path", "find_sweeps", "load_defenses", "measure_curves"]

if TYPE_CHECKING:  # a Guard is imported lazily (it pulls in the estimators)
    from ..defenses.guard import Guard

    DefenseLike = GatedDefense | Guard


@dataclass(frozen=True)
class SweptAttack:
    """The partitions of one swept attack parameter under one threat model, in increasing value order."""

    name: str  # "pgd.eps"
    attack: str
    param: str
    threat_model: str
    partitions: tuple[str, ...]
    values: tuple[Any, ...]


def find_sweeps(metadata: Mapping[str, Any], attacks: Sequence[str] | None = None,
                names: Sequence[str] | None = None) -> list[SweptAttack]:
    """The sweeps recorded in table `metadata` (only partitions in `attacks` when given; only sweeps named in
    `names`, e.g. ``["pgd.eps"]``, when given). Raises `LogitguardError` when there is none, or a named one
    is missing, saying what the table has."""
    groups: dict[tuple[str, str], list[tuple[Any, str, dict[str, Any]]]] = {}
    for partition, entry in (metadata.get("attacks") or {}).items():
        sweep = entry.get("sweep") if isinstance(entry, Mapping) else None
        if not isinstance(sweep, Mapping) or (attacks is not None and partition not in attacks):
            continue
        if not {"attack", "param", "value"} <= set(sweep):
            raise LogitguardError(f"metadata attacks[{partition!r}]['sweep'] must hold attack, param and value; "
                                  f"got {dict(sweep)!r}")
        name = str(sweep.get("name") or f"{sweep['attack']}.{sweep['param']}")
        model = threat_of(metadata, partition)["model"]
        groups.setdefault((name, model), []).append((sweep["value"], partition, dict(sweep)))
    found = sorted({name for name, _ in groups})
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise LogitguardError(f"no sweep {', '.join(missing)} in the table; it has "
                                  f"{', '.join(found) or 'none'} (export with --sweep ATTACK.PARAM=V1,V2,…)")
    if not groups:
        raise LogitguardError("the table has no swept attack (partitions exported with "
                              "`logitguard-produce export --sweep ATTACK.PARAM=V1,V2,…`)")
    out = []
    for (name, model), members in sorted(groups.items()):
        if names is not None and name not in names:
            continue
        members.sort(key=lambda m: (not isinstance(m[0], (int, float)), m[0] if isinstance(m[0], (int, float))
                                    else str(m[0])))
        first = members[0][2]
        out.append(SweptAttack(name, str(first["attack"]), str(first["param"]), model,
                               tuple(m[1] for m in members), tuple(m[0] for m in members)))
    return out


def load_defenses(specs: Sequence[str]) -> dict[str, DefenseLike]:
    """Defenses by name from ``--defense`` items: a guard file (named after its stem, ``guard.npz`` →
    ``guard``), ``MANIFEST.json:NAME`` (that pipeline of a manifest) or ``MANIFEST.json`` (its every pipeline
    but the bare model). Raises `LogitguardError` for a missing file, pipeline or a repeated name."""
    from ..defenses.guard import Guard
    from ..defenses.pipelines import load_pipelines

    out: dict[str, DefenseLike] = {}

    def add(name: str, defense: DefenseLike, spec: str) -> None:
        if name == NO_DEFENSE or name in out:
            raise LogitguardError(f"--defense {spec}: the name {name!r} is "
                                  f"{'the bare model' if name == NO_DEFENSE else 'given twice'}")
        out[name] = defense

    for spec in specs:
        manifest, sep, pipeline = spec.rpartition(":")
        if sep and manifest.endswith(".json"):
            pipelines = load_pipelines(manifest)
            if pipeline not in pipelines:
                raise LogitguardError(f"--defense {spec}: no pipeline {pipeline!r} in {manifest}; it has "
                                      f"{', '.join(pipelines)}")
            add(pipeline, pipelines[pipeline].build(), spec)
        elif spec.endswith(".json"):
            for name, entry in load_pipelines(spec).items():
                if entry.detector is not None or entry.corrector is not None:
                    add(name, entry.build(), spec)
        else:
            if not Path(spec).is_file():
                raise LogitguardError(f"--defense {spec}: no such guard file (or give MANIFEST.json[:NAME])")
            add(Path(spec).stem, Guard.load(spec), spec)
    return out


def curve_path(path: TableSource | str | os.PathLike, defenses: Mapping[str, DefenseLike] | None = None, *,
               sweeps: Sequence[str] | None = None, x: str = "param") -> dict[str, Any]:
    """`measure_curves` on the rows of `path` (a `TableSource` of one split, ``TableSource(path, split="test")``,
    or a path), reading only the clean and swept partitions and the columns the defenses need (never
    ``features``)."""
    source = TableSource.of(path)
    keys = read_keys(source)
    found = find_sweeps(keys.metadata, attacks=list(np.unique(keys.attack)), names=sweeps)
    present = table_columns(source)
    columns = [c for c in ("linf", "l2") if c in present]
    if "noisy_logits" in present and any(_needs_noise(d) for d in (defenses or {}).values()):
        columns.append("noisy_logits")
    wanted = [CLEAN, *(p for s in found for p in s.partitions)]
    present_attacks = list(np.unique(keys.attack))
    if _aimed(keys.metadata, present_attacks, defenses or {}):
        wanted = present_attacks  # a tier's worst case is over every attack of the tier, the oblivious ones too
    table = read_table(source, attacks=wanted, columns=columns)
    result = measure_curves(table, defenses, sweeps=[s.name for s in found], x=x)
    return {"table": str(source), **result}


def measure_curves(table: LogitTable, defenses: Mapping[str, DefenseLike] | None = None, *,
                      sweeps: Sequence[str] | None = None, x: str = "param") -> dict[str, Any]:
    """Accuracy and detection rate per point of every sweep (`sweeps` names, e.g. ``["pgd.eps"]``; default all)
    on the rows of `table`, of one split (``table.select(split="test")``).

    Returns a JSON-ready dict: ``split`` (the rows' split), ``x`` (the plotted axis: ``param``, ``eps``, ``linf`` or ``l2``),
    ``defenses`` (name → description), and ``curves``: one per (sweep, threat model) with ``sweep``,
    ``attack``, ``param``, ``threat_model``, ``threat``, ``samples`` and ``points``; each point has
    ``partition``, ``value`` (0 for clean), ``linf`` and ``l2`` (mean measured size, None without the column),
    ``accuracy`` {defense: share, ``none`` first}, ``attack_success_rate`` {defense: share} (attacked
    points) and ``detection_rate`` {defense with a detector: share}. NaN becomes None.
    """
    if x not in CURVE_X:
        raise LogitguardError(f"unknown x axis {x!r}; choose from {', '.join(CURVE_X)}")
    split = require_one_split(table, "robustness curves")
    if not table.has_labels:
        raise LogitguardError("robustness curves need ground-truth labels, and some rows have none")
    if CLEAN not in table.attacks:
        raise LogitguardError(f"robustness curves need clean rows (the value-0 point); the table has {table.attacks}")
    found = find_sweeps(table.metadata, attacks=table.attacks, names=sweeps)
    if x == "eps" and any(s.param != "eps" for s in found):
        raise LogitguardError(f"--x eps needs sweeps of eps; {', '.join(s.name for s in found if s.param != 'eps')} "
                              "sweep(s) another parameter (use --x param, linf or l2)")
    defenses = dict(defenses or {})
    decisions = {NO_DEFENSE: GatedDefense(None, None).check_table(table),
                 **{name: _decide(defense, table) for name, defense in defenses.items()}}
    thresholds = {name: _detector(defense).threshold_ for name, defense in defenses.items()
                  if _detector(defense) is not None}
    curves = [_curve(table, sweep, decisions, thresholds) for sweep in found]
    return {"split": split, "x": x,
            "defenses": {NO_DEFENSE: {"kind": "model"}, **{n: _describe(d) for n, d in defenses.items()}},
            "curves": curves, "tiers": _tier_points(table, defenses)}


def _aimed(metadata: Mapping[str, Any], attacks: Sequence[str], defenses: Mapping[str, Any]) -> list[str]:
    """The partitions of a defense-aware tier aimed at one of `defenses`."""
    out = []
    for attack in attacks:
        if attack == CLEAN:
            continue
        threat = threat_of(metadata, attack)
        if threat["model"] in AIMED_TIERS and threat.get("target") in defenses:
            out.append(attack)
    return out


def _tier_points(table: LogitTable, defenses: Mapping[str, DefenseLike]) -> list[dict[str, Any]]:
    """Per defense and defense-aware tier (and the bare model's adaptive tier), the per-sample worst-case robust
    accuracy at each budget the aimed attacks ran with: ``pipeline``, ``threat_model`` and ``points``
    [{``eps``, ``robust_accuracy`` and, where the threat table has them, ``robust_accuracy_low``/``_high``}].
    Empty when the table has no attack aimed at the defenses."""
    from .threat import threat_model_table

    aimed = _aimed(table.metadata, table.attacks, defenses)
    budgets = sorted({e for e in (attack_eps(table.metadata, a) for a in aimed) if e is not None})
    if not budgets:
        return []
    gated = {name: d if isinstance(d, GatedDefense) else d.defense for name, d in defenses.items()}
    frame = threat_model_table(table, gated, budgets=budgets)
    keep = frame[frame["threat_model"].isin(AIMED_TIERS) & (frame["pipeline"] != NO_DEFENSE)
                 | (frame["pipeline"] == NO_DEFENSE) & (frame["threat_model"] == "adaptive")]
    extra = [c for c in ("robust_accuracy_low", "robust_accuracy_high") if c in frame.columns]
    return [{"pipeline": name, "threat_model": tier,
             "points": [{"eps": float(r["eps"]), **{c: _num(r[c]) for c in ("robust_accuracy", *extra)}}
                        for r in group.sort_values("eps").to_dict(orient="records")]}
            for (name, tier), group in keep.groupby(["pipeline", "threat_model"], sort=False)]


def _curve(table: LogitTable, sweep: SweptAttack, decisions: Mapping[str, Decision],
           thresholds: Mapping[str, float]) -> dict[str, Any]:
    """One curve: its points over the samples with a row in every partition of `sweep` (and a clean row)."""
    from .evaluate import detection_records, evaluation_records

    parts = list(sweep.partitions)
    keys = pd.DataFrame({"split": table.split, "sample_id": table.sample_id, "attack": table.attack})
    inside = keys["attack"].isin([CLEAN, *parts]).to_numpy()
    counts = keys[inside].groupby(["split", "sample_id"])["attack"].transform("nunique")
    rows = np.flatnonzero(inside)[counts.to_numpy() == len(parts) + 1]
    if not len(rows):
        raise LogitguardError(f"sweep {sweep.name}: no sample has a clean row and a row in every partition "
                              f"({', '.join(parts)})")
    sub = RowKeys.of(table.take(rows), model_label=decisions[NO_DEFENSE].model_label[rows])
    records = evaluation_records(sub, {n: d.label[rows] for n, d in decisions.items()}, parts)
    records = records[records["subset"] == "full"].set_index(["attack", "defense"])
    detection = pd.DataFrame(columns=["attack", "detector"])
    if thresholds:
        detection = detection_records(sub, {n: decisions[n].score[rows] for n in thresholds}, thresholds, parts,
                                      intervals=False)
    detection = detection.set_index(["attack", "detector"])
    sizes = {c: table.column(c)[rows] for c in ("linf", "l2") if c in table.columns}
    first = parts[0]
    clean = {"partition": CLEAN, "value": 0, "linf": 0.0, "l2": 0.0,
             "accuracy": {n: _num(records.at[(first, n), "clean_accuracy"]) for n in decisions},
             "coverage": {n: _num(records.at[(first, n), "coverage"]) for n in decisions},
             "detection_rate": {n: _num(detection.at[(first, n), "threshold_fpr"]) for n in thresholds}}
    points = [clean]
    for partition, value in zip(parts, sweep.values):
        mine = sub.attack == partition
        points.append({
            "partition": partition, "value": value,
            **{c: _num(size[mine].mean()) if c in sizes else None for c, size in
               (("linf", sizes.get("linf")), ("l2", sizes.get("l2")))},
            "accuracy": {n: _num(records.at[(partition, n), "robust_accuracy"]) for n in decisions},
            "attack_success_rate": {n: _num(records.at[(partition, n), "attack_success_rate"]) for n in decisions},
            "detection_rate": {n: _num(detection.at[(partition, n), "threshold_tpr"]) for n in thresholds},
        })
    return {"sweep": sweep.name, "attack": sweep.attack, "param": sweep.param, "threat_model": sweep.threat_model,
            "threat": THREAT_TEXT.get(sweep.threat_model, sweep.threat_model),
            "samples": int((sub.attack == CLEAN).sum()), "points": points}


# -- helpers ----------------------------------------------------------------------------------------


def _decide(defense: DefenseLike, table: LogitTable) -> Decision:
    """The defense's `Decision` on every row; a guard first checks the table has its classes and queries."""
    if isinstance(defense, GatedDefense):
        return defense.check_table(table)
    frame = defense.check_table(table)
    return Decision(*(frame[c].to_numpy() for c in Decision._fields))


def _detector(defense: DefenseLike) -> Any:
    return (defense if isinstance(defense, GatedDefense) else defense.defense).detector


def _needs_noise(defense: DefenseLike) -> bool:
    return (defense if isinstance(defense, GatedDefense) else defense.defense).needs_noise


def _describe(defense: DefenseLike) -> dict[str, Any]:
    gated = defense if isinstance(defense, GatedDefense) else defense.defense
    return {"kind": "pipeline" if isinstance(defense, GatedDefense) else "guard", **gated.describe()}


def _num(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


