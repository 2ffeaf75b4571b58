"""Pairing: the clean and attacked rows of one attack, matched by ``sample_id``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from ..errors import TableError
from .schema import CLEAN
from .table import LogitTable, RowKeys


class Pair(NamedTuple):
    """Clean and attacked rows of the same samples, aligned row by row on (split, sample_id)."""

    clean: LogitTable
    attacked: LogitTable


def pair(table: LogitTable, attack: str) -> Pair:
    """Align `attack` rows with the clean rows of the same (split, sample_id).

    Samples present in only one of the two are dropped. Raises `TableError` if there is no clean or no
    `attack` row, nothing aligns, or a sample's label differs between its clean and attacked rows.
    """
    clean_rows, attacked_rows = pair_rows(table, attack)
    return Pair(table.take(clean_rows), table.take(attacked_rows))


def pair_rows(table: LogitTable | RowKeys, attack: str) -> tuple[np.ndarray, np.ndarray]:
    """`pair` as row numbers: (clean rows, attacked rows), int arrays of the same length, aligned."""
    for name in (CLEAN, attack):
        if name not in table.attacks:
            raise TableError(f"no {name!r} rows in the table; it has attacks {table.attacks}")
    frames = []
    split = pd.factorize(table.split)[0]  # merging on integer codes: far less memory than on string objects
    for name in (CLEAN, attack):
        rows = np.flatnonzero(table.attack == name)
        frames.append(pd.DataFrame({"split": split[rows], "sample_id": table.sample_id[rows], "row": rows}))
    merged = frames[1].merge(frames[0], on=["split", "sample_id"], suffixes=("_attacked", "_clean"), sort=False)
    if merged.empty:
        raise TableError(f"no {attack!r} row shares a (split, sample_id) with a clean row")
    clean_rows, attacked_rows = merged["row_clean"].to_numpy(), merged["row_attacked"].to_numpy()
    mismatch = np.flatnonzero(table.labels[clean_rows] != table.labels[attacked_rows])
    if len(mismatch):
        i = mismatch[0]
        raise TableError(
            f"sample_id {table.sample_id[clean_rows[i]]} (split {table.split[clean_rows[i]]!r}) has label "
            f"{table.labels[clean_rows[i]]} in clean rows but {table.labels[attacked_rows[i]]} in {attack!r} rows"
        )
    return clean_rows, attacked_rows
