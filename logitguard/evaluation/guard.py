"""What a guard is worth: fit one and measure it per threat model, or describe a saved one with its intervals.

`fit_guard` (the fitting recipe of `logitguard.defenses.recipe`, then `measure_guard`) and
`guard_from_pipeline` (the files of a pipeline manifest, measured) return a `Guard` carrying its figures;
`describe_guard` is `Guard.info` with the exact binomial intervals of figures saved before intervals existed.
"""

from __future__ import annotations

import os
from typing import Any

from ..defenses.guard import Guard
from ..defenses.recipe import DEFAULT_FPR, fit_guard_parts, package_pipeline
from ..errors import LogitguardError
from ..tables import CLEAN, LogitTable
from ..tables.threat import DEFAULT_BUDGETS, NO_DEFENSE, THREAT_MODELS, format_budget, threat_of
from .intervals import binomial_interval
from .threat import fill_intervals, threat_model_table, to_records

GUARD_NAME = "guard"  # the pipeline name a freshly fitted guard is measured under

__all__ = ["GUARD_NAME", "describe_guard", "fit_guard", "guard_from_pipeline", "measure_guard"]


def fit_guard(table: LogitTable | str | os.PathLike, *, detector: str | None = "auto", corrector: str | None = None,
              on_flag: str = "reject", fpr: float = DEFAULT_FPR, attacks: list[str] | None = None, seed: int = 0,
              budgets: tuple[float, ...] = DEFAULT_BUDGETS) -> Guard:
    """Fit a guard on the ``train`` rows of `table` (`logitguard.defenses.recipe.fit_guard_parts`: detector,
    corrector, on_flag, fpr, attacks, seed), then measure it on the ``test`` rows at `budgets`."""
    guard, read = fit_guard_parts(table, detector=detector, corrector=corrector, on_flag=on_flag, fpr=fpr,
                                  attacks=attacks, seed=seed)
    return measure_guard(guard, read, name=GUARD_NAME, budgets=budgets)


def guard_from_pipeline(manifest: str | os.PathLike, name: str, table: LogitTable | str | os.PathLike, *,
                        budgets: tuple[float, ...] = DEFAULT_BUDGETS) -> Guard:
    """Package pipeline `name` of a manifest as a guard, measured on `table`.

    Adaptive attacks in the table aimed at `name` count only when they recorded the same files (sha256) as
    the manifest's: then the guard carries adaptive figures for exactly these weights.
    """
    guard, read, files = package_pipeline(manifest, name, table)
    return measure_guard(guard, read, name=name, budgets=budgets, files=files)


def measure_guard(guard: Guard, table: LogitTable, *, name: str = GUARD_NAME,
                  budgets: tuple[float, ...] = DEFAULT_BUDGETS, files: dict[str, str] | None = None) -> Guard:
    """Measure `guard` per threat model on the ``test`` rows of `table` and record the figures on it.

    Surrogate and adaptive attacks count when aimed at pipeline `name`; adaptive ones only when they
    recorded `files` (the sha256 of the files they attacked). Returns `guard`.
    """
    usable, skipped = [], []
    for attack in table.attacks:
        threat = threat_of(table.metadata, attack)
        target = threat.get("target")
        if threat["model"] in ("surrogate", "adaptive") and target not in (name, NO_DEFENSE):
            continue
        if threat["model"] == "adaptive" and target == name and threat.get("defense_files") != files:
            skipped.append(attack)
            continue
        usable.append(attack)
    if "test" not in table.splits:
        raise LogitguardError(f"evaluating a guard needs a 'test' split; the table has {table.splits}")
    rows = table.select(split="test", attacks=usable)
    frame = threat_model_table(rows, {name: guard.defense}, budgets=budgets)
    frame["pipeline"] = frame["pipeline"].replace({name: GUARD_NAME} if name != GUARD_NAME else {})
    guard.threat = to_records(frame)
    measured = set(frame.loc[frame["pipeline"] == GUARD_NAME, "threat_model"])
    present = {t["model"] for t in (threat_of(table.metadata, a) for a in usable if a != CLEAN)
               if t.get("target") in (None, name)}
    guard.unmeasured = {}
    for model in THREAT_MODELS:
        if model in measured:
            continue
        if model == "adaptive" and skipped:
            why = (f"the table's {len(skipped)} adaptive partitions aimed at {name!r} attacked other files (sha256 "
                   "differs)")
        elif model in present:
            why = f"no {model} attack within the budgets ({', '.join(format_budget(e) for e in budgets)})"
        elif model in ("surrogate", "adaptive"):
            why = f"no {model} attack against this guard's files in the table"
        else:
            why = f"no {model} attack in the table"
        if model in ("surrogate", "adaptive", "query"):
            why += "; attack them with `logitguard-produce attack-defenses` (docs/threat-models.md)"
        guard.unmeasured[model] = why
    return guard


def describe_guard(guard: Guard) -> dict[str, Any]:
    """`Guard.info` with intervals: the achieved FPR's exact 95% binomial interval over the calibration rows
    (``achieved_fpr_low`` / ``_high``) and the rates' intervals of threat records saved without them."""
    info = guard.info()
    detector = info["detector"]
    if detector is not None:
        rows = detector["calibration_rows"]
        low, high = binomial_interval(round(detector["achieved_fpr"] * rows), rows)
        detector["achieved_fpr_low"], detector["achieved_fpr_high"] = float(low), float(high)
    info["threat"] = fill_intervals(info["threat"])
    return info
