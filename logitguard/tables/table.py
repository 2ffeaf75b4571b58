"""The in-memory table: `LogitTable` (validated columns as zero-copy NumPy views, row selection) and its
logit-free row keys (`RowKeys`, gathered batch by batch by `RowCollector`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import TableError
from .arrays import distinct_values, int_view, label_array, string_codes, string_column, tensor_array, tensor_view
from .schema import CLEAN, OPTIONAL_COLUMNS


class _Rows:
    """What a table and its logit-free keys (`RowKeys`) both derive from ``metadata``, ``attack``, ``split``."""

    metadata: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @cached_property
    def attacks(self) -> list[str]:
        """Distinct attack names, ``clean`` first, then in sorted order."""
        return distinct_values(self.attack, first=CLEAN)

    @cached_property
    def splits(self) -> list[str]:
        return distinct_values(self.split)


@dataclass(frozen=True, eq=False)
class LogitTable(_Rows):
    """A validated logit table held as one Arrow table, with NumPy views of its columns.

    Build one with `read_table` or `LogitTable.from_arrays`; the constructor assumes `arrow` already
    conforms to the contract. Array properties are zero-copy views of the Arrow buffers wherever the
    column is a single chunk without nulls (always true after `read_table` of a single file).

    Attributes
    ----------
    arrow : pyarrow.Table
        The conformed table (canonical column types, one chunk per column).
    metadata : dict
        Schema metadata (``num_classes``, ``class_names``, ``attacks``, ``noise``, ...).
    """

    arrow: pa.Table
    metadata: dict[str, Any]

    @classmethod
    def from_arrays(
        cls,
        *,
        logits: np.ndarray,
        sample_id: np.ndarray,
        split: str | Sequence[str] | np.ndarray,
        attack: str | Sequence[str] | np.ndarray,
        label: np.ndarray | None = None,
        metadata: Mapping[str, Any] | None = None,
        **optional: np.ndarray | None,
    ) -> LogitTable:
        """Build and validate a table from arrays.

        Parameters
        ----------
        logits : array of shape (N, C)
        sample_id : int array of shape (N,)
        split, attack : a string for every row, or an array of shape (N,)
        label : int array of shape (N,), optional; negative values mean "unknown" (stored as null).
        metadata : dict, optional; ``num_classes`` and ``class_names`` are filled in when absent.
        **optional : optional columns: ``noisy_logits`` (N, K, C), ``pred`` (N,), ``success`` (N,),
            ``linf`` (N,), ``l2`` (N,), ``features`` (N, F), ``insen`` (N, S), ``external_score`` (N,),
            ``external_label`` (N,), ``flagged`` (N,).
        """
        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise TableError(f"logits must have shape (N, C), got shape {logits.shape}")
        n = len(logits)
        unknown = sorted(set(optional) - set(OPTIONAL_COLUMNS))
        if unknown:
            raise TableError(f"unknown optional column(s) {unknown}; allowed: {list(OPTIONAL_COLUMNS)}")
        columns: dict[str, pa.Array] = {
            "sample_id": pa.array(np.asarray(sample_id)),
            "split": string_column(split, n, "split"),
            "attack": string_column(attack, n, "attack"),
            "label": label_array(label, n),
            "logits": tensor_array(logits),
        }
        for name in OPTIONAL_COLUMNS:
            value = optional.get(name)
            if value is None:
                continue
            value = np.asarray(value)
            columns[name] = tensor_array(value) if value.ndim > 1 else pa.array(value)
        lengths = {name: len(col) for name, col in columns.items()}
        if len(set(lengths.values())) > 1:
            raise TableError(f"columns have different lengths: {lengths}")
        from .validation import conform  # conform builds LogitTables: imported here, not at the top

        return conform(pa.table(columns), metadata=dict(metadata or {}))

    # -- shape and metadata ------------------------------------------------------------------

    def __len__(self) -> int:
        return self.arrow.num_rows

    @property
    def columns(self) -> list[str]:
        return list(self.arrow.column_names)

    # -- column views --------------------------------------------------------------------------

    @cached_property
    def logits(self) -> np.ndarray:
        """float32 array of shape (N, C)."""
        return tensor_view(self.arrow.column("logits"), (self.num_classes,))

    @cached_property
    def noisy_logits(self) -> np.ndarray | None:
        """float32 array of shape (N, K, C): logits of K noise-perturbed copies of each input."""
        if "noisy_logits" not in self.arrow.column_names:
            return None
        col = self.arrow.column("noisy_logits")
        return tensor_view(col, (col.type.list_size, self.num_classes))

    @cached_property
    def features(self) -> np.ndarray | None:
        """float32 array of shape (N, F): penultimate-layer activations, or None."""
        return self._vector("features")

    @cached_property
    def insen(self) -> np.ndarray | None:
        """float32 array of shape (N, S): input-sensitivity statistics (docs/tables.md), or None."""
        return self._vector("insen")

    def _vector(self, name: str) -> np.ndarray | None:
        if name not in self.arrow.column_names:
            return None
        col = self.arrow.column(name)
        return tensor_view(col, (col.type.list_size,))

    @cached_property
    def labels(self) -> np.ndarray:
        """int64 array of shape (N,); -1 where the ground truth is unknown (deployment data)."""
        return int_view(self.arrow.column("label"))

    @cached_property
    def sample_id(self) -> np.ndarray:
        return int_view(self.arrow.column("sample_id"))

    @cached_property
    def split(self) -> np.ndarray:
        """Object array of shape (N,) with each row's split name."""
        return self.arrow.column("split").to_numpy()

    @cached_property
    def attack(self) -> np.ndarray:
        """Object array of shape (N,) with each row's attack name (``clean`` for unattacked rows)."""
        return self.arrow.column("attack").to_numpy()

    def column(self, name: str) -> np.ndarray | None:
        """A scalar optional column (``pred``, ``success``, ``linf``, ``l2``, ``external_*``) as NumPy, or None.

        Integer nulls become -1 and float nulls NaN; boolean nulls become False.
        """
        if name not in self.arrow.column_names:
            return None
        col = self.arrow.column(name)
        if pa.types.is_integer(col.type):
            return int_view(col)
        if pa.types.is_boolean(col.type):
            return col.fill_null(False).to_numpy()
        return col.to_numpy()  # floats: nulls become NaN

    @property
    def has_labels(self) -> bool:
        """True when every row has a ground-truth label."""
        return self.arrow.column("label").null_count == 0

    # -- row selection -------------------------------------------------------------------------

    def take(self, indices: np.ndarray) -> LogitTable:
        """Rows at `indices` (int array or boolean mask of shape (N,)), metadata unchanged."""
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        return LogitTable(self.arrow.take(pa.array(indices, pa.int64())).combine_chunks(), self.metadata)

    def select(self, *, split: str | None = None, attacks: str | Sequence[str] | None = None) -> LogitTable:
        """Rows of one split and/or some attacks; raises `TableError` when nothing matches."""
        return self.take(_selection(self, split, attacks))


def require_one_split(rows: LogitTable | RowKeys, purpose: str, *, hint: str = "test") -> str | None:
    """The one split `rows` hold (None when they have no row). Rows of several splits are refused with a
    `TableError` that says how to select them (with the split `hint`): a fit or an evaluation uses every row
    it is given, so a forgotten selection must not fit on test rows or mix splits in one figure."""
    splits = rows.splits
    if len(splits) > 1:
        raise TableError(f"{purpose}: the table holds splits {splits}; select the rows of one first: "
                         f"table.select(split={hint!r}), or TableSource(path, split={hint!r}) for a table on disk")
    return splits[0] if splits else None


def _selection(table: LogitTable | RowKeys, split: str | None, attacks: str | Sequence[str] | None) -> np.ndarray:
    """The (N,) mask of `select`; raises `TableError` when nothing matches."""
    mask = np.ones(len(table), dtype=bool)
    if split is not None:
        mask &= table.split == split
    if attacks is not None:
        attacks = [attacks] if isinstance(attacks, str) else list(attacks)
        mask &= np.isin(table.attack, attacks)
    if not mask.any():
        raise TableError(
            f"no rows match split={split!r}, attacks={attacks!r}; "
            f"the table has splits {table.splits} and attacks {table.attacks}"
        )
    return mask


@dataclass(frozen=True, eq=False)
class RowKeys(_Rows):
    """A table's rows without their logits: keys, labels and per-row `values` of shape (N,).

    What pairing (`pair_rows`), `select` and per-attack metrics need, tens of bytes per row, so it can be
    held for any table while the logits stream past (`RowCollector` builds one batch by batch; `of` takes
    one from a `LogitTable`). `values` holds per-row results such as predictions or scores.
    """

    split: np.ndarray  # object (N,)
    attack: np.ndarray  # object (N,)
    sample_id: np.ndarray  # int64 (N,)
    labels: np.ndarray  # int64 (N,), -1 where unknown
    metadata: dict[str, Any]
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, table: LogitTable, **values: np.ndarray) -> RowKeys:
        """The keys of `table`'s rows (views, no copy) with `values` attached."""
        return cls(table.split, table.attack, table.sample_id, table.labels, table.metadata, dict(values))

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all())

    def take(self, indices: np.ndarray) -> RowKeys:
        """Rows at `indices` (int array or boolean mask), values included."""
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        return RowKeys(self.split[indices], self.attack[indices], self.sample_id[indices], self.labels[indices],
                       self.metadata, {k: v[indices] for k, v in self.values.items()})

    def select(self, *, split: str | None = None, attacks: str | Sequence[str] | None = None) -> RowKeys:
        """As `LogitTable.select`: rows of one split and/or some attacks; `TableError` when nothing matches."""
        return self.take(_selection(self, split, attacks))


class RowCollector:
    """Builds `RowKeys` from streamed batches: ``add(batch, name=array, …)`` per batch, then `finish`.

    Split and attack names are kept as small integer codes while collecting. `finish` checks that the
    keys are unique over the whole stream (each batch was only checked on its own).
    """

    def __init__(self) -> None:
        self._names: dict[str, dict[str, int]] = {"split": {}, "attack": {}}
        self._parts: dict[str, list[np.ndarray]] = {}
        self.metadata: dict[str, Any] | None = None
        self.rows = 0
        self._finished: RowKeys | None = None

    def add(self, batch: LogitTable | RowKeys, **values: np.ndarray) -> None:
        """The keys of `batch` (a table, or keys already taken from one with their `values`) and `values`, (B,) each."""
        if isinstance(batch, RowKeys):
            values = {**batch.values, **values}
            split, attack = (pa.chunked_array([pa.array(v, pa.string())]) for v in (batch.split, batch.attack))
        else:
            split, attack = batch.arrow.column("split"), batch.arrow.column("attack")
        parts = {"split": string_codes(split, self._names["split"]),
                 "attack": string_codes(attack, self._names["attack"]),
                 "sample_id": np.array(batch.sample_id), "labels": np.array(batch.labels),
                 **{f"value:{k}": np.asarray(v) for k, v in values.items()}}
        if self.rows and set(parts) != set(self._parts):
            raise ValueError(f"every batch needs the same values; got {sorted(values)}")
        for name, part in parts.items():
            if len(part) != len(batch):
                raise ValueError(f"value {name!r} has {len(part)} entries for a batch of {len(batch)} rows")
            self._parts.setdefault(name, []).append(part)
        self.metadata = batch.metadata
        self.rows += len(batch)

    def finish(self) -> RowKeys:
        """The collected rows (the same object on every call once no batch was added since)."""
        if self._finished is not None and len(self._finished) == self.rows:
            return self._finished
        if self.metadata is None:
            raise TableError("no rows were read")
        whole = {name: np.concatenate(parts) for name, parts in self._parts.items()}
        self._parts = {name: [part] for name, part in whole.items()}  # one copy, and more batches may follow
        names = {c: np.array(list(lookup), dtype=object) for c, lookup in self._names.items()}
        dup = _duplicate_rows(whole["split"], whole["attack"], whole["sample_id"])
        if dup is not None:
            first, second = dup
            raise TableError(
                f"duplicate row for (split={names['split'][whole['split'][first]]!r}, "
                f"attack={names['attack'][whole['attack'][first]]!r}, sample_id={int(whole['sample_id'][first])}) "
                f"at rows {first} and {second}"
            )
        self._finished = RowKeys(names["split"][whole["split"]], names["attack"][whole["attack"]], whole["sample_id"],
                                 whole["labels"], self.metadata,
                                 {name[6:]: part for name, part in whole.items() if name.startswith("value:")})
        return self._finished


def _duplicate_rows(*keys: np.ndarray) -> tuple[int, int] | None:
    """The first two row numbers sharing all `keys` (integer arrays), or None."""
    frame = pd.DataFrame({str(i): k for i, k in enumerate(keys)})
    dup = frame.duplicated(keep=False).to_numpy()
    if not dup.any():
        return None
    first = int(np.flatnonzero(dup)[0])
    same = np.flatnonzero(dup & (frame == frame.iloc[first]).all(axis=1).to_numpy())
    return int(same[0]), int(same[1])
