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

from ..files import atomic_output
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
    rows. On panels over ε, the result's ``tiers`` (attacks aimed at the defenses, at their budgets) are drawn
    as square markers labelled with their threat model."""
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
        if curve["param"] == "eps" and result["x"] in ("param", "eps", "linf"):
            _draw_tiers(ax, result.get("tiers") or [], colours)
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


def _draw_tiers(ax, tiers: list, colours: list) -> None:
    """Worst-case robust accuracy of the defense-aware tiers at their budgets (square markers, dotted), each
    labelled ``tier (defense)``; 95% intervals as error bars where present."""
    for i, tier in enumerate(tiers):
        points = tier["points"]
        xs = np.array([p["eps"] for p in points], dtype=float)
        ys = np.array([np.nan if p["robust_accuracy"] is None else p["robust_accuracy"] for p in points], dtype=float)
        err = None
        if all(p.get("robust_accuracy_low") is not None and p.get("robust_accuracy_high") is not None for p in points):
            err = np.vstack([ys - [p["robust_accuracy_low"] for p in points],
                             [p["robust_accuracy_high"] for p in points] - ys])
        colour, _ = TIER_STYLE.get(tier["threat_model"], (colours[i % len(colours)], ":"))
        ax.errorbar(xs, ys, yerr=err, marker="s", linestyle=":", capsize=2, color=colour,
                    alpha=0.6 if tier["pipeline"] == "none" else 1.0,
                    label=f"{tier['threat_model']} ({tier['pipeline']})")


TIER_STYLE = {"transfer": ("tab:green", ":"), "query": ("tab:purple", "-."), "oblivious": ("tab:blue", "--"),
              "surrogate": ("tab:orange", "--"), "adaptive": ("tab:red", "-")}


def threat_curves(threat: pd.DataFrame, path: str | os.PathLike, *, no_defense: str = "none") -> Path:
    """Robust accuracy against the L∞ budget, one panel per pipeline and one line per measured threat model of
    `logitguard.evaluation.threat.threat_model_table`'s frame (adaptive included, labelled with its tier); the
    budget-0 point is the clean accuracy. 95% intervals as error bars where the frame has
    ``robust_accuracy_low`` / ``_high``; the model alone's adaptive line is drawn grey in every panel."""
    plt = _pyplot()
    names = list(dict.fromkeys(threat["pipeline"]))
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharey=True)
    bounds = {"robust_accuracy_low", "robust_accuracy_high"} <= set(threat.columns)
    bare = threat[(threat["pipeline"] == no_defense) & (threat["threat_model"] == "adaptive")].sort_values("eps")
    for ax, name in zip(axes.flat, names):
        mine = threat[threat["pipeline"] == name]
        clean = float(mine["clean_accuracy"].iloc[0])
        if name != no_defense and not bare.empty:
            ax.plot([0, *(255 * bare["eps"])], [1.0, *bare["robust_accuracy"]], color="grey", linewidth=1,
                    label="model alone, adaptive")
        for tier, (colour, style) in TIER_STYLE.items():
            part = mine[mine["threat_model"] == tier].sort_values("eps")
            if part.empty:
                continue
            xs = np.r_[0.0, 255 * part["eps"].to_numpy(float)]
            ys = np.r_[clean, part["robust_accuracy"].to_numpy(float)]
            err = None
            if bounds:
                low = np.r_[clean, part["robust_accuracy_low"].to_numpy(float)]
                high = np.r_[clean, part["robust_accuracy_high"].to_numpy(float)]
                err = np.nan_to_num(np.vstack([ys - low, high - ys]))
            ax.errorbar(xs, ys, yerr=err, color=colour, linestyle=style, marker="o", markersize=3, capsize=2,
                        linewidth=2.2 if tier == "adaptive" else 1.3, label=tier)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("L∞ budget ε (×1/255)")
        ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=6, loc="lower left")
    for ax in axes[:, 0]:
        ax.set_ylabel("robust accuracy (selected set)")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Per-sample worst case per threat model (ε = 0: clean accuracy)", fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
