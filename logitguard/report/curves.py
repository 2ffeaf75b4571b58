"""Accuracy-against-perturbation curves written out and rendered (`logitguard curve`): curve.json, the
figure, and plain text."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..files import refuse_overwrite, staged_output
from ..tables import CLEAN
from ..tables.threat import format_budget
from .summary import percent, render_table

__all__ = ["FILES", "format_curves", "write_curves"]


FILES = ("curve.json", "curve.png")


def write_curves(result: Mapping[str, Any], out: str | os.PathLike, *, overwrite: bool = False,
                 plot: bool = True) -> dict[str, Any]:
    """Write ``OUT/curve.json`` and, when matplotlib is installed and `plot`, ``OUT/curve.png``, added to `out`
    in one step (`staged_output`); refuses to replace either file unless `overwrite`. Returns
    ``{"files": [...], "plot": None or why there is no figure}``."""
    out = Path(out)
    refuse_overwrite([out / f for f in FILES], overwrite)
    note = None
    if not plot:
        note = "not drawn (plot=False)"
    elif not _have_matplotlib():
        note = "not drawn: matplotlib is missing (pip install 'logitguard[plot]')"
    with staged_output(out, overwrite=overwrite) as stage:
        (stage / "curve.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        if note is None:
            from .plots import robustness_curves as draw

            draw(result, stage / "curve.png")
    files = [out / FILES[0]] + ([out / FILES[1]] if note is None else [])
    return {"files": [str(f) for f in files], "plot": note}


def format_curves(result: Mapping[str, Any]) -> str:
    """Plain text: per curve, one line per point with each defense's accuracy (and detection rate)."""
    blocks = []
    for curve in result["curves"]:
        names = list(curve["points"][0]["accuracy"])
        detectors = list(curve["points"][0]["detection_rate"])
        headers = [curve["param"], "mean linf", "mean l2", *(f"acc ({n})" for n in names),
                   *(f"detected ({n})" for n in detectors)]
        lines = [[CLEAN if p["partition"] == CLEAN else format_budget(p["value"]) if isinstance(p["value"], float)
                  else str(p["value"]), _fmt(p["linf"]), _fmt(p["l2"]),
                  *(percent(p["accuracy"][n]) for n in names), *(percent(p["detection_rate"][n]) for n in detectors)]
                 for p in curve["points"]]
        blocks.append("\n".join([f"{curve['sweep']} ({curve['threat']}; {curve['samples']} samples)",
                                 *render_table(headers, lines, left=2)]))
    tiers = result.get("tiers") or []
    if tiers:
        budgets = sorted({p["eps"] for t in tiers for p in t["points"]})
        lines = [[t["pipeline"], t["threat_model"],
                  *(next((percent(p["robust_accuracy"]) for p in t["points"] if p["eps"] == e), "-") for e in budgets)]
                 for t in tiers]
        blocks.append("\n".join(["Attacks aimed at the defenses (per-sample worst case over the tier's attacks)",
                                 *render_table(["defense", "threat model", *(format_budget(e) for e in budgets)],
                                               lines, left=2)]))
    return "\n\n".join(blocks) + ("\n\n(a rejected attacked row counts as defended, a rejected clean row as an error; "
                                  "detected: successful attacks flagged, on clean rows the false-positive rate)")


def _have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
