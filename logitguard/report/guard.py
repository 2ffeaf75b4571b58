"""A guard described in plain text (`logitguard guard fit`, `guard info`)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..evaluation.intervals import with_interval
from .summary import percent
from .threat_text import format_threat_models

__all__ = ["format_guard_info"]


def format_guard_info(info: dict[str, Any]) -> str:
    """Plain text of `describe_guard` (or `Guard.info`): input, policy, detector and corrector, threat figures, provenance."""
    detector, corrector = info["detector"], info["corrector"]
    noise = info.get("noise") or {}
    recipe = ", ".join(f"{q['kind']}:{q['scale']:g}" for q in noise.get("recipe", [])) or "-"
    lines = [
        f"input: logits of {info['num_classes']} classes ({', '.join(info['classes'])})",
        f"noise queries: {info['num_queries']}" + (f" (recipe {recipe})" if info["num_queries"] else " (none needed)"),
        f"on_flag: {info['on_flag']}",
        "detector: none (every row goes to the corrector)" if detector is None else
        f"detector: {detector['kind']}, threshold {detector['threshold']:.4g}, target FPR {percent(detector['fpr'])}, "
        f"achieved {with_interval(detector, 'achieved_fpr')} on {detector['calibration_rows']} clean calibration rows",
        f"corrector: {'none' if corrector is None else corrector['name']}",
        "",
    ]
    if info["threat"]:
        frame = pd.DataFrame(info["threat"]).astype({"harm": float})
        lines.append(format_threat_models(frame))
    for model, why in info["unmeasured"].items():
        lines.append(f"not measured: {model}: {why}")
    prov = info["provenance"]
    source = prov.get("table") or "an in-memory table"
    digest = prov.get("table_sha256") or prov.get("logits_sha256") or ""
    lines += ["", f"provenance: fitted on {source} (sha256 {digest[:12]}…), logitguard {prov.get('logitguard')}, "
                  f"{prov.get('created')}"]
    return "\n".join(lines)
