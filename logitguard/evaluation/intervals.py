"""95% intervals for every figure the project reports (docs/threat-models.md, "Intervals").

- a single rate (clean accuracy, coverage, robust accuracy): exact Clopper–Pearson, `binomial_interval`;
- a difference of two figures on the same samples (harm = pipeline − bare model): paired bootstrap over
  samples, percentile interval, `paired_bootstrap_interval`;
- AUROC-like statistics of scores (AUROC, AUPR, FPR at 95% TPR): bootstrap over rows stratified by class
  (negatives and positives resampled separately, so every resample has both), `stratified_bootstrap_interval`.

Bootstraps are seeded (same inputs, same interval) and vectorised: a resample is a row of multinomial counts
(how often each sample is drawn), and statistics are computed for blocks of resamples at once.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
_BLOCK_CELLS = 4_000_000  # resamples x samples per block: bounds memory (~32 MB of float64)

__all__ = ["LEVEL", "RESAMPLES", "SEED", "binomial_interval", "bootstrap_counts", "paired_bootstrap_interval",
           "stratified_bootstrap_interval", "with_interval"]


def binomial_interval(k: np.ndarray | int, n: np.ndarray | int, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Exact Clopper–Pearson interval of a rate k/n; `k`, `n` broadcast (any shape) -> (low, high) fractions.

    low = 0 when k = 0, high = 1 when k = n; NaN where n = 0. Scalars in, 0-d arrays out (float() them).
    """
    from scipy.stats import beta

    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64))
    alpha = 1.0 - level
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        high = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    empty = n <= 0
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


def bootstrap_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> Iterator[np.ndarray]:
    """Blocks of bootstrap resamples of `n` items as counts: arrays (b, n) of ints summing to n per row,
    b rows per block, `resamples` rows in all, the same for the same (n, resamples, seed)."""
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // max(n, 1))
    done = 0
    while done < resamples:
        b = min(block, resamples - done)
        yield _counts(rng, n, b)
        done += b


def _counts(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """b bootstrap resamples of n items as counts (b, n), float64: how often each item was drawn."""
    draws = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def paired_bootstrap_interval(
    a: np.ndarray, b: np.ndarray, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of mean(a) − mean(b) where `a[..., i]` and `b[..., i]` are measured on the same
    sample i (0/1 indicators or real values).

    a, b: (..., n), broadcast; the leading axes are separate differences that share the resamples.
    Returns (low, high) of shape (...); NaN where n = 0.
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = diff.shape[-1]
    lead = diff.shape[:-1]
    if n == 0:
        return np.full(lead, np.nan), np.full(lead, np.nan)
    flat = diff.reshape(-1, n)
    means = np.concatenate([counts @ flat.T / n for counts in bootstrap_counts(n, resamples, seed)])  # (B, R)
    alpha = 1.0 - level
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    return low.reshape(lead), high.reshape(lead)


def stratified_bootstrap_interval(
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    negatives: int,
    positives: int,
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of a statistic of weighted rows, resampling negatives and positives separately.

    statistic(neg_weights (b, negatives), pos_weights (b, positives)) -> (b,) or (b, k): the statistic of b
    resamples at once, each row of weights the counts of a resample. Returns (low, high), shape () or (k,);
    NaN when a class is empty.
    """
    if not negatives or not positives:
        probe = np.asarray(statistic(np.ones((1, negatives)), np.ones((1, positives))))
        return np.full(probe.shape[1:], np.nan), np.full(probe.shape[1:], np.nan)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // (negatives + positives))
    values = []
    for start in range(0, resamples, block):
        b = min(block, resamples - start)
        values.append(np.asarray(statistic(_counts(rng, negatives, b), _counts(rng, positives, b))))
    alpha = 1.0 - level
    low, high = np.nanquantile(np.concatenate(values), [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


def with_interval(record: Mapping[str, Any], name: str, *, digits: int | None = None) -> str:
    """``record[name]`` with its interval: ``"63.4% [60.1, 66.5]"`` (a share in points), or with `digits`
    ``"0.812 [0.790, 0.833]"``; the bare figure when ``name_low`` / ``name_high`` are absent or undefined,
    ``"-"`` when the figure is."""
    value, low, high = (_number(record.get(key)) for key in (name, f"{name}_low", f"{name}_high"))
    if value is None:
        return "-"
    if digits is None:
        text, bounds = f"{100 * value:.1f}%", (None if low is None or high is None
                                               else f"[{100 * low:.1f}, {100 * high:.1f}]")
    else:
        text, bounds = f"{value:.{digits}f}", (None if low is None or high is None
                                               else f"[{low:.{digits}f}, {high:.{digits}f}]")
    return text if bounds is None else f"{text} {bounds}"


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else value
