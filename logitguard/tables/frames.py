"""pandas conversion: a `LogitTable` as a long (one row per table row) or wide DataFrame.
"""

from __future__ import annotations

import pandas as pd

from ..errors import TableError
from .table import LogitTable


def to_pandas(table: LogitTable, wide: bool = False) -> pd.DataFrame:
    """The table as a DataFrame for auditing.

    Long form (default): one row per table row; `logits` (and `noisy_logits`, `features`) hold an
    array per cell. Wide form: `logits` is expanded into one float32 column per class, named by class
    name; other list columns stay as array cells.
    """
    frame = table.arrow.to_pandas()
    frame["label"] = frame["label"].astype("Int64")  # keep nulls visible as <NA>
    if not wide:
        return frame
    clash = sorted(set(table.class_names) & set(frame.columns))
    if clash:
        raise TableError(f"class name(s) {clash} collide with table columns; use wide=False")
    per_class = pd.DataFrame(table.logits, columns=table.class_names, index=frame.index)
    return pd.concat([frame.drop(columns="logits"), per_class], axis=1)
