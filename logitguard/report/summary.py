"""What a logit table holds: row counts, accuracy and attack success per split x attack.

Everything is recomputed from the logits: a producer's own `pred`/`success` columns are not trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..evaluation.metrics import attack_success_rate
from ..tables import CLEAN, LogitTable, RowKeys

# Metadata keys echoed by `summarize`; the rest (e.g. long per-class lists) stays in the table.
_METADATA_KEYS = ("schema_version", "dataset", "model", "attacks", "threat", "noise", "producer", "seed")


def summarize(table: LogitTable) -> dict[str, Any]:
    """A JSON-ready summary of `table`.

    Returns
    -------
    dict with ``num_rows``, ``num_classes``, ``class_names``, ``noise_queries`` ([K, C] or None) and
    ``metadata``, and ``conditions``: one entry per (split, attack) with ``rows``, ``threat`` (the
    attack's threat model, docs/threat-models.md; None for clean rows), ``accuracy`` (argmax
    vs label over labelled rows), ``attack_success_rate`` (among samples whose clean row is classified
    correctly, the fraction whose attacked row is not; None for clean rows), and mean/median of the
    image-space perturbation norms ``linf``/``l2`` when the table has them. Undefined values are None.
    """
    norms = {name: table.column(name) for name in ("linf", "l2") if name in table.columns}
    noisy = table.noisy_logits
    return summarize_rows(RowKeys.of(table, model_label=table.logits.argmax(axis=1), **norms),
                          noise_queries=None if noisy is None else noisy.shape[1:])


def summarize_rows(rows: RowKeys, *, noise_queries: Sequence[int] | None = None) -> dict[str, Any]:
    """`summarize` from per-row values (what a streamed pass keeps): ``rows.values`` holds ``model_label`` (the
    argmax of the logits, (N,) int) and, when the table has them, ``linf`` and ``l2``; `noise_queries`
    is (K, C) or None."""
    model_label = np.asarray(rows.values["model_label"])
    frame = pd.DataFrame({
        "split": rows.split,
        "attack": rows.attack,
        "sample_id": rows.sample_id,
        "label": rows.labels,
        "labelled": rows.labels >= 0,
        "correct": model_label == rows.labels,
        "model_label": model_label,
    })
    norms = [n for n in ("linf", "l2") if n in rows.values]
    for name in norms:
        frame[name] = rows.values[name]
    clean = frame.loc[frame["attack"] == CLEAN, ["split", "sample_id", "model_label"]]
    # Each row's clean row's model label (NaN without a clean row: never a successful attack).
    frame = frame.merge(clean, on=["split", "sample_id"], how="left", suffixes=("", "_clean"))

    from ..tables.threat import threat_of

    conditions = []
    for (split, attack), group in frame.groupby(["split", "attack"], sort=False):
        labelled = group[group["labelled"]]
        entry: dict[str, Any] = {
            "split": split,
            "attack": attack,
            "threat": None if attack == CLEAN else threat_of(rows.metadata, attack)["model"],
            "rows": len(group),
            "accuracy": _mean(labelled["correct"]),
            "attack_success_rate": None if attack == CLEAN else _nan_to_none(attack_success_rate(
                group["model_label_clean"].to_numpy(), group["model_label"].to_numpy(), group["label"].to_numpy())),
        }
        for name in norms:
            values = group[name].dropna()
            entry[f"{name}_mean"] = _mean(values)
            entry[f"{name}_median"] = None if values.empty else float(values.median())
        conditions.append(entry)
    conditions.sort(key=lambda e: (e["split"], e["attack"] != CLEAN, e["attack"]))

    return {
        "num_rows": len(rows),
        "num_classes": rows.num_classes,
        "class_names": rows.class_names,
        "noise_queries": None if noise_queries is None else [int(n) for n in noise_queries],
        "conditions": conditions,
        "metadata": {k: rows.metadata[k] for k in _METADATA_KEYS if k in rows.metadata},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text for a `summarize` result."""
    names = summary["class_names"]
    shown = ", ".join(names[:10]) + (f", … ({len(names)} in all)" if len(names) > 10 else "")
    lines = [
        f"rows: {summary['num_rows']}    classes: {summary['num_classes']} ({shown})",
        "noise queries: "
        + ("none" if summary["noise_queries"] is None else "K={} x C={}".format(*summary["noise_queries"])),
        "",
    ]
    norm_keys = [k for k in ("linf_mean", "linf_median", "l2_mean", "l2_median") if k in summary["conditions"][0]]
    headers = ["split", "attack", "threat", "rows", "accuracy", "success", *norm_keys]
    rows = [
        [c["split"], c["attack"], c.get("threat") or "-", str(c["rows"]), percent(c["accuracy"]),
         percent(c["attack_success_rate"]),
         *(_num(c[k]) for k in norm_keys)]
        for c in summary["conditions"]
    ]
    lines += render_table(headers, rows, left=3)
    lines.append("(success: attack success rate among samples whose clean row is classified correctly)")
    meta = summary["metadata"]
    if meta:
        lines.append("")
        for key, value in meta.items():
            if key == "attacks" and isinstance(value, dict):
                for attack, params in value.items():
                    lines.append(f"attack {attack}: {_inline(params)}")
            elif key == "threat" and isinstance(value, dict):
                for attack, entry in value.items():
                    lines.append(f"threat {attack}: {_threat_details(entry)}")
            elif key == "noise" and isinstance(value, dict) and "recipe" in value:
                recipe = ", ".join(f"{q['kind']}:{q['scale']}" for q in value["recipe"])
                lines.append(f"noise: {recipe}" + (f" (seed {value['seed']})" if "seed" in value else ""))
            else:
                lines.append(f"{key}: {_inline(value)}")
    return "\n".join(lines)


def render_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], left: int = 1, *,
                 markdown: bool = False) -> list[str]:
    """The lines of a text table, cells given as strings (others are passed through `str`).

    Plain text (default): columns padded, the first `left` left-aligned (names), the rest right-aligned,
    a rule of dashes under the header. ``markdown=True``: a GitHub Markdown table, cells unpadded (`left`
    does not apply). The one table renderer of the core (reports, CLI output, the producer's CLI).
    """
    headers = [str(h) for h in headers]
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
                *("| " + " | ".join(r) + " |" for r in rows)]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def markdown_frame(frame: pd.DataFrame, *, index: bool = True) -> str:
    """A DataFrame whose cells are already formatted as a Markdown table (`render_table`), its index as the
    first columns when `index`; one string."""
    frame = frame.reset_index() if index else frame
    return "\n".join(render_table(list(frame.columns), list(frame.itertuples(index=False)), markdown=True))


def _nan_to_none(value: float) -> float | None:
    return None if value != value else value


def _mean(values: pd.Series) -> float | None:
    return None if values.empty else float(np.mean(values.astype(float)))


def percent(value: float | None) -> str:
    """A share as ``"12.3%"``; ``"-"`` when undefined (None or NaN)."""
    return "-" if value is None or value != value else f"{100 * value:.1f}%"


def format_with_interval(x: float | None, low: float | None = None, high: float | None = None, *,
                         signed: bool = False) -> str:
    """A share with its 95% interval: ``"63.4% [60.1, 66.5]"`` (`percent` alone when either bound is None or
    NaN). ``signed=True`` writes a difference in points: ``"+4.1 pt [+1.2, +7.0]"``."""
    def undefined(v: float | None) -> bool:
        return v is None or v != v

    if undefined(x):
        return "-"
    if signed:
        text = f"{100 * x:+.1f} pt"
        return text if undefined(low) or undefined(high) else f"{text} [{100 * low:+.1f}, {100 * high:+.1f}]"
    text = percent(x)
    return text if undefined(low) or undefined(high) else f"{text} [{100 * low:.1f}, {100 * high:.1f}]"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _threat_details(entry: Any) -> str:
    """One line per attack's threat entry; file hashes shortened to 12 hex digits."""
    if not isinstance(entry, dict):
        return str(entry)
    parts = []
    for key, value in sorted(entry.items(), key=lambda kv: kv[0] != "model"):  # the model first
        if key == "defense_files" and isinstance(value, dict):
            value = ", ".join(f"{name}@{str(digest)[:12]}" for name, digest in value.items())
            parts.append(f"defense_files=[{value}]")
        elif key == "substitute" and isinstance(value, dict) and "sha256" in value:
            parts.append(f"substitute={_inline({**value, 'sha256': str(value['sha256'])[:12]})}")
        else:
            parts.append(f"{key}={_inline(value)}")
    return ", ".join(parts)


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_inline(v)}" for k, v in value.items())
    return str(value)
