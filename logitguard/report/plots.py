"""PNG figures for reports (optional: needs the ``plot`` extra, matplotlib).

Every function takes the DataFrame an analysis returned and a path, draws with the non-interactive Agg
backend, and writes the PNG atomically. Nothing here computes results.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import atomic_output
from ..errors import LogitguardError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LogitguardError("plots need matplotlib: pip install 'logitguard[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def supporting_class_bars(freqs: pd.DataFrame, path: str | os.PathLike, *, top: int = 8) -> Path:
    """One bar chart per attack: the `top` most frequent supporting classes (seed Fig. 2–3)."""
    plt = _pyplot()
    attacks = list(freqs.columns)
    cols = min(3, len(attacks))
    rows = -(-len(attacks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, attack in zip(axes.flat, attacks):
        best = freqs[attack].sort_values(ascending=False).head(top)
        ax.barh(best.index[::-1].astype(str), best.to_numpy()[::-1], color="tab:blue")
        ax.set_title(attack)
        ax.set_xlabel("share of top-k slots")
    for ax in list(axes.flat)[len(attacks):]:
        ax.axis("off")
    fig.suptitle("Supporting classes per attack")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def heatmap(matrix: pd.DataFrame, path: str | os.PathLike, *, title: str, fmt: str = "{:.2f}") -> Path:
    """An annotated heatmap of a matrix (transfer accuracy, Bhattacharyya coefficients)."""
    plt = _pyplot()
    values = matrix.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * values.shape[1], 0.8 + 0.6 * values.shape[0]))
    image = ax.imshow(values, cmap="viridis", vmin=np.nanmin(values), vmax=np.nanmax(values))
    ax.set_xticks(range(values.shape[1]), [str(c) for c in matrix.columns], rotation=45, ha="right")
    ax.set_yticks(range(values.shape[0]), [str(i) for i in matrix.index])
    ax.set_xlabel(matrix.columns.name or "")
    ax.set_ylabel(matrix.index.name or "")
    middle = (np.nanmin(values) + np.nanmax(values)) / 2
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8,
                color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title)
    out = _save(fig, path)
    plt.close(fig)
    return out


def roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str | os.PathLike, *,
               title: str) -> Path:
    """ROC curves, one per detector: name → (fpr, tpr, auroc)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for name, (fpr, tpr, area) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} ({area:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate (clean rows flagged)")
    ax.set_ylabel("true-positive rate (successful attacks flagged)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    out = _save(fig, path)
    plt.close(fig)
    return out


def mean_logit_histogram(hist: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Histogram of the per-row mean logit, clean vs each attack (seed Figure 1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    centres = hist.index.to_numpy(dtype=float)
    for attack in hist.columns:
        counts = hist[attack].to_numpy(dtype=float)
        ax.plot(centres, counts / max(counts.sum(), 1.0), label=attack,
                linewidth=2.4 if attack == "clean" else 1.2, color="black" if attack == "clean" else None)
    ax.set_xlabel("mean logit of a row")
    ax.set_ylabel("share of rows")
    ax.set_title("Mean logit, clean vs attacked")
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


CURVE_AXES = {"linf": "mean L∞ of the attacked rows", "l2": "mean L2 of the attacked rows"}


def robustness_curves(result: Mapping, path: str | os.PathLike) -> Path:
    """Accuracy (solid) and detection rate (dashed) against the sweep's x axis, one panel per curve of
    `logitguard.evaluation.curves.measure_curves`' result (seed 003, Fig. 14); the value-0 point is the clean
    rows."""
    plt = _pyplot()
    curves = result["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(7.4 * len(curves), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, curve in zip(axes.flat, curves):
        points = curve["points"]
        key = "value" if result["x"] in ("param", "eps") else result["x"]
        xs = np.array([np.nan if p[key] is None else float(p[key]) for p in points])
        for i, name in enumerate(points[0]["accuracy"]):
            colour = "black" if i == 0 else colours[(i - 1) % len(colours)]
            acc = [np.nan if p["accuracy"][name] is None else p["accuracy"][name] for p in points]
            ax.plot(xs, acc, marker="o", color=colour, label=f"accuracy ({'model' if i == 0 else name})")
            if name in points[0]["detection_rate"]:
                rate = [np.nan if p["detection_rate"][name] is None else p["detection_rate"][name] for p in points]
                ax.plot(xs, rate, marker="x", linestyle="--", color=colour, label=f"detected ({name})")
        ax.set_xlabel(CURVE_AXES.get(result["x"], curve["param"]))
        ax.set_ylabel("share of rows")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{curve['sweep']} — {curve['threat_model']}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    threats = "; ".join(dict.fromkeys(c["threat"] for c in curves))
    fig.suptitle(f"Accuracy vs perturbation ({threats})", fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
