"""What the odds test learns at fit time: class moments, per-pair quantiles and the correction classifiers.

NumPy, pandas and scikit-learn; nothing here runs when a fitted test scores or corrects a row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from ....errors import LogitguardError

MIN_STD = 1e-6


class Moments:
    """Running per-class sums of the group-averaged raw features (and their squares) of clean rows grouped by
    predicted class (`queries`: the number of query groups G): `add` batch after batch, then `result`. Rows
    are sorted by class and summed per run (`np.add.reduceat`)."""

    def __init__(self, num_classes: int, queries: int) -> None:
        self.c, self.k = num_classes, queries
        self.sums = np.zeros((num_classes, queries * num_classes))
        self.squares = np.zeros((num_classes, queries * num_classes))
        self.counts = np.zeros(num_classes)
        self.n = 0

    def add(self, odds: Any, logits: np.ndarray, noisy: np.ndarray | None) -> None:
        for rows in row_batches(len(logits), self.k * self.c):
            y, g = odds.grouped_changes(logits[rows], None if noisy is None else noisy[rows])
            if g.shape[1:] != (self.k, self.c):
                raise LogitguardError(f"rows have {g.shape[1]} query groups x {g.shape[2]} classes; earlier ones had "
                                      f"{self.k} x {self.c}")
            order = np.argsort(y, kind="stable")
            sorted_y = y[order]
            flat = g.reshape(len(y), self.k * self.c)[order].astype(np.float64, copy=False)
            starts = np.flatnonzero(np.r_[True, sorted_y[1:] != sorted_y[:-1]])  # first row of each class run
            present = sorted_y[starts]  # distinct classes, so += below adds each run once
            self.sums[present] += np.add.reduceat(flat, starts, axis=0)
            self.squares[present] += np.add.reduceat(np.square(flat, out=flat), starts, axis=0)
            self.counts += np.bincount(y, minlength=self.c)
            self.n += len(y)

    def result(self, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (C, G, C); classes with fewer than `min_rows` rows get the pooled moments of all rows."""
        if not self.n:
            raise LogitguardError("no clean rows to learn the odds statistics from")
        c, k, n = self.c, self.k, self.n
        sums, squares, counts = self.sums, self.squares, self.counts[:, None]
        pooled_mean = sums.sum(axis=0) / n
        pooled_var = squares.sum(axis=0) / n - pooled_mean**2
        enough = counts >= min_rows
        mean = np.where(enough, sums / np.maximum(counts, 1), pooled_mean)
        var = np.where(enough, squares / np.maximum(counts, 1) - mean**2, pooled_var)
        std = np.maximum(np.sqrt(np.maximum(var, 0.0)), MIN_STD)
        return mean.reshape(c, k, c), std.reshape(c, k, c)


def row_batches(rows: int, per_row: int, budget: int = 1 << 20) -> Iterator[slice]:
    """Row slices holding about `budget` elements each: (B, K, C) temporaries stay cache-sized."""
    step = max(1, budget // max(per_row, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def class_quantiles(y: np.ndarray, z: np.ndarray, q: float, min_rows: int) -> np.ndarray:
    """Per-class q-quantile of each column of z (N, C) over rows grouped by y: (C, C); pooled for small classes."""
    c = z.shape[1]
    finite = np.where(np.isfinite(z), z, np.nan)
    pooled = np.nanquantile(finite, q, axis=0)
    out = np.tile(np.nan_to_num(pooled, nan=0.0), (c, 1))
    frame = pd.DataFrame(finite)
    counts = np.bincount(y, minlength=c)
    per_class = frame.groupby(y).quantile(q)
    keep = [cls for cls in per_class.index if counts[cls] >= min_rows]
    out[keep] = per_class.loc[keep].to_numpy()
    return np.nan_to_num(out, nan=0.0)  # the (y, y) entries: never used (feature is -inf there)


def fit_correction(y: np.ndarray, x: np.ndarray, labels: np.ndarray, c: int, correction: str,
                   min_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The correction classifiers from predicted classes y (N,), features x (N, F) and true labels (N,).

    ``logistic``: one multinomial logistic regression per predicted class with at least `min_rows` rows and
    two labels, else the argmax rule. ``reference``: only rows whose true label differs from y (successful
    attacks); a class seen with one label always answers it, with none it uses the argmax rule. Classes a
    model never saw get bias -inf, so y itself is never returned by a ``reference`` model.

    Returns the weights (C, C, F), biases (C, C) and the fitted flag (C,) of each predicted class."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels).astype(np.int64)
    if correction == "reference":
        keep = (labels != y) & (labels >= 0) & (labels < c)
        if not keep.any():
            raise LogitguardError("correction='reference' learns from successful attacks (attacked rows the "
                                  "model gets wrong, with their true labels); there are none")
        y, x, labels = y[keep], x[keep], labels[keep]
    x = np.where(np.isfinite(x), x, 0.0)
    weights = np.zeros((c, c, x.shape[1]))
    bias_ = np.full((c, c), -np.inf)
    fitted = np.zeros(c, dtype=bool)
    for cls in np.unique(y):  # one small model per predicted class (fit time only)
        rows = y == cls
        seen = np.unique(labels[rows])
        if correction == "reference" and len(seen) == 1:
            bias_[cls, seen[0]] = 0.0
            fitted[cls] = True
            continue
        if correction == "logistic" and (rows.sum() < min_rows or len(seen) < 2):
            continue
        model = LogisticRegression(max_iter=1000).fit(x[rows], labels[rows])
        coef, bias = model.coef_, model.intercept_
        if len(seen) == 2:  # sklearn's binary form: one row for the second class
            coef, bias = np.vstack([-coef / 2, coef / 2]), np.array([-bias[0] / 2, bias[0] / 2])
        weights[cls, seen] = coef
        bias_[cls, seen] = bias
        fitted[cls] = True
    return weights, bias_, fitted
