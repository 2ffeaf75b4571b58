"""The noise kind of each query (from a table's recipe) and the query groups the odds test z-scores."""

from __future__ import annotations

from typing import Any

import numpy as np

from ....errors import LogitguardError


def noise_kinds_from_metadata(metadata: dict[str, Any]) -> np.ndarray | None:
    """The noise kind of each query, (K,) str such as ``"gaussian:0.05"``, from a table's ``noise`` metadata
    (the producer's recipe, one item per query); None when the table records none."""
    noise = metadata.get("noise")
    if not noise:
        return None
    try:
        return np.array([f"{item['kind']}:{float(item['scale']):g}" for item in noise["recipe"]])
    except (KeyError, TypeError, ValueError):
        raise LogitguardError(f"the table's noise metadata is not a recipe: {noise!r}") from None


def check_kinds(noise_kinds: Any, queries: int) -> np.ndarray | None:
    """`noise_kinds` as (K,) str, checked against the number of queries; None stays None."""
    if noise_kinds is None:
        return None
    kinds = np.asarray(noise_kinds)
    if kinds.ndim != 1 or len(kinds) != queries:
        raise LogitguardError(f"noise_kinds must give the kind of each of the {queries} noise queries, "
                              f"got shape {kinds.shape}")
    return kinds.astype(str)


def kind_ids(kinds: np.ndarray) -> np.ndarray:
    """Group id per query (K,): queries with equal kind labels share one (ids follow sorted labels)."""
    return np.unique(kinds, return_inverse=True)[1].astype(np.int64).reshape(-1)


def group_weights(group: np.ndarray) -> np.ndarray | None:
    """(G, K) weights that average the queries of each group (`group` (K,): each query's group id); None when
    every query is its own group (no averaging)."""
    if np.array_equal(group, np.arange(len(group))):
        return None
    weights = np.zeros((int(group.max()) + 1, len(group)))
    weights[group, np.arange(len(group))] = 1.0
    return weights / weights.sum(axis=1, keepdims=True)
