"""Attack similarity: the Bhattacharyya coefficient between attacks' supporting-class frequencies, and
whether it ranks attacks as the corrector's transfer matrix does (`rank_agreement`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from ..errors import LogitguardError
from ..tables import CLEAN


def bhattacharyya(p: np.ndarray, q: np.ndarray) -> float:
    """Bhattacharyya coefficient Σ_k sqrt(p_k q_k) of two distributions (1-D, same length, positionally
    matched), each normalised to sum 1 first: 1 for equal distributions, 0 for disjoint supports."""
    p, q = _distribution(p, "p"), _distribution(q, "q")
    if p.size != q.size:
        raise LogitguardError(f"p has {p.size} entries and q has {q.size}; they must cover the same classes")
    return float(np.clip(np.sqrt(p * q).sum(), 0.0, 1.0))


def bhattacharyya_matrix(freqs: pd.DataFrame) -> pd.DataFrame:
    """Attack × attack Bhattacharyya coefficients (symmetric, diagonal 1) between the columns of
    `freqs` (classes × attacks, e.g. from `supporting_frequencies`), each column normalised first."""
    values = freqs.to_numpy(dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise LogitguardError(f"freqs must be a non-empty classes × attacks DataFrame, got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise LogitguardError("freqs must hold non-negative finite values")
    totals = values.sum(axis=0)
    if (totals <= 0).any():
        empty = [str(c) for c in freqs.columns[totals <= 0]]
        raise LogitguardError(f"columns {empty} of freqs sum to 0; a distribution needs positive mass")
    roots = np.sqrt(values / totals)
    bc = roots.T @ roots
    bc = np.clip((bc + bc.T) / 2, 0.0, 1.0)  # exact symmetry despite float rounding
    np.fill_diagonal(bc, 1.0)
    index = pd.Index(freqs.columns, name="attack")
    return pd.DataFrame(bc, index=index, columns=index.copy())


def rank_agreement(bc: pd.DataFrame, transfer: pd.DataFrame, *, relative: bool = False) -> dict[str, float | int]:
    """Does Bhattacharyya similarity predict transfer? Spearman's rho between the two over attack pairs.

    `bc` is attack × attack (`bhattacharyya_matrix`); `transfer` is `evaluate.transfer_matrix`'s
    accuracy, rows = evaluated on, columns = trained on (its "clean" row is ignored). Every ordered
    pair (a evaluated on, b trained on), a ≠ b, of attacks present in both matrices is one point
    (bc[a, b], transfer[a, b]); pairs with a missing value are dropped. With ``relative=True`` the
    transfer is divided by transfer[a, a] (the accuracy of a's own corrector), which removes how hard
    attack a is from the comparison. A rho near 1 means: the more alike two attacks' supporting
    classes, the better a corrector for one defends against the other.

    Returns ``{"spearman": rho, "p_value": p, "pairs": n}``.
    """
    from scipy.stats import spearmanr

    attacks = [a for a in bc.index
               if a != CLEAN and a in bc.columns and a in transfer.index and a in transfer.columns]
    x = bc.loc[attacks, attacks].to_numpy(dtype=np.float64)
    y = transfer.loc[attacks, attacks].to_numpy(dtype=np.float64)
    if relative:
        y = y / np.diag(y)[:, None]
    off = ~np.eye(len(attacks), dtype=bool)
    x, y = x[off], y[off]
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        raise LogitguardError(
            f"rank_agreement needs at least 3 off-diagonal attack pairs with values in both matrices, "
            f"got {len(x)} (attacks in both: {attacks})"
        )
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        which = "bc" if np.ptp(x) == 0 else "transfer"
        raise LogitguardError(f"{which} is constant over the {len(x)} attack pairs; a rank correlation is undefined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho, p_value = spearmanr(x, y)
    return {"spearman": float(rho), "p_value": float(p_value), "pairs": int(len(x))}


def _distribution(values: Any, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise LogitguardError(f"{name} must be a non-empty 1-D distribution, got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise LogitguardError(f"{name} must hold non-negative finite values")
    total = values.sum()
    if total <= 0:
        raise LogitguardError(f"{name} sums to 0; a distribution needs positive mass")
    return values / total
