"""Reading a table in passes, memory bounded by the batch size, not by the table.

- `stream_batches`: the validated batches of a table (`iter_batches` with the streamed batch size,
  refusing a selection with no rows); `all_columns`: the optional columns `read_table` reads by default.
- `TableStream`: one filtered view of a table that can be read in several passes (same rows, same order),
  with `TableStream.collect` to compute something on chosen rows (the detectors' streamed fitting).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from ..errors import LogitguardError, TableError
from . import OPTIONAL_COLUMNS, LogitTable, RowKeys, TableSource, iter_batches, read_keys, stream_batch_rows, table_columns

__all__ = ["TableStream", "all_columns", "stream_batches"]


class TableStream:
    """The rows of `source` (a `TableSource`, or a path: the whole table) of `attacks`, read batch by batch as
    often as needed.

    `keys` (read up front from the key columns alone, or given) numbers the rows 0..N-1 in stream order;
    every pass checks that it meets the same rows in the same order (a table rewritten in between is an
    error, not a silent mix-up).
    """

    def __init__(self, source: TableSource | str | os.PathLike, *, attacks: Sequence[str] | None = None,
                 columns: Sequence[str] = (), batch_rows: int | None = None, keys: RowKeys | None = None) -> None:
        self.source = TableSource.of(source, attacks=attacks)
        self.path = self.source.path
        self.columns = list(columns)
        self.batch_rows = batch_rows or stream_batch_rows(self.path, self.columns)
        self.keys = read_keys(self.source) if keys is None else keys

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, attacks: Sequence[str] | None = None, *, columns: Sequence[str] | None = None
                ) -> Iterator[tuple[np.ndarray, LogitTable]]:
        """(global row numbers, batch) over the stream's rows, or only those of `attacks`; the stream's optional
        columns, or only `columns`."""
        rows = np.arange(len(self.keys)) if attacks is None else np.flatnonzero(np.isin(self.keys.attack, attacks))
        start = 0
        for batch in iter_batches(self.source, attacks=attacks, columns=self.columns if columns is None else columns,
                                  batch_rows=self.batch_rows):
            index = rows[start:start + len(batch)]
            if len(index) != len(batch) or not np.array_equal(self.keys.sample_id[index], batch.sample_id):
                raise TableError(f"{self.path}: the table changed while it was being read; run again")
            start += len(batch)
            yield index, batch
        if start != len(rows):
            raise TableError(f"{self.path}: the table changed while it was being read; run again")
        pa.default_memory_pool().release_unused()  # give the pass's buffers back before the next step

    def each(self, rows: np.ndarray, fn: Callable[[np.ndarray, np.ndarray, np.ndarray | None], None], *,
             noise: bool = False) -> None:
        """Call ``fn(positions, logits, noisy_logits)`` batch by batch for the stream's rows `rows` (global row
        numbers, any order): `positions` are the places in `rows` of the batch's wanted rows, `logits` their
        float32 logits (B, C), `noisy_logits` their noise queries (B, K, C) with `noise`, else None. Only
        batches of the wanted rows' attacks are read, and the noise column only with `noise`."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        position = np.full(len(self.keys), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        columns = self.columns if noise else [c for c in self.columns if c != "noisy_logits"]
        for index, batch in self.batches(attacks=sorted(set(self.keys.attack[rows])), columns=columns):
            where = position[index]
            wanted = where >= 0
            if wanted.all():
                fn(where, batch.logits, batch.noisy_logits if noise else None)
            elif wanted.any():
                fn(where[wanted], batch.logits[wanted], batch.noisy_logits[wanted] if noise else None)

    def collect(self, rows: np.ndarray, fn: Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, ...]], *,
                noise: bool = False) -> list[np.ndarray]:
        """`fn(logits, noisy_logits)` on the stream's rows `rows` (as in `each`): each array that `fn` returns,
        for all of `rows`, in the order of `rows`."""
        outputs: list[np.ndarray] = []

        def keep(where: np.ndarray, logits: np.ndarray, noisy: np.ndarray | None) -> None:
            results = [np.asarray(r) for r in fn(logits, noisy)]
            if not outputs:
                outputs.extend(np.empty((len(rows), *r.shape[1:]), dtype=r.dtype) for r in results)
            for out, result in zip(outputs, results):
                out[where] = result

        self.each(rows, keep, noise=noise)
        if not outputs:
            raise LogitguardError("no rows to compute on")
        return outputs


def all_columns(path: TableSource | str | os.PathLike) -> list[str]:
    """The optional columns present in the table at `path` (what `read_table` reads by default)."""
    present = table_columns(path)
    return [c for c in OPTIONAL_COLUMNS if c in present]


def stream_batches(source: TableSource | str | os.PathLike, *, attacks: Sequence[str] | None = None,
                   columns: Sequence[str] = (), batch_rows: int | None = None) -> Iterator[LogitTable]:
    """`iter_batches` of the rows of `source` (of `attacks` among them, when given) that the streamed passes
    read, refusing a selection with no rows; `batch_rows` defaults to `stream_batch_rows` for `columns`."""
    return iter_batches(source, attacks=attacks, columns=columns,
                        batch_rows=batch_rows or stream_batch_rows(source, columns), require_rows=True)
