"""The sample-holdout sampler: a deterministic split by ``sample_id``, so a sample's clean and attacked rows
fall on the same side.
"""

from __future__ import annotations

import numpy as np


def holdout_mask(sample_id: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A deterministic share `fraction` of samples (N,) bool, by a hash of sample id and seed.

    Every row of a sample (clean or attacked, any batch or file) lands on the same side.
    """
    if fraction <= 0:
        return np.zeros(len(sample_id), dtype=bool)
    h = (np.asarray(sample_id, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(31)
    return (h % np.uint64(1 << 20)).astype(np.float64) < fraction * (1 << 20)
