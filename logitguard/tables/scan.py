"""Reading the rows of a selection (`TableSource`: split and attacks) out of a Parquet dataset, as record
batches: whole-dataset scans (`scan`) and the streamed per-file reads (`stream_files`), with the row filter
they share.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .source import TableSource

# Streaming reads each file with its own Parquet reader through a 1 MiB buffered stream: pages are
# decoded as batches are asked for. (pyarrow's dataset scanner, even with readahead 1 and no pre-buffering,
# holds about a row group per stream: ~200 MiB of Arrow memory at C=1000 against ~25 MiB this way.)
_STREAM_BUFFER_BYTES = 1 << 20


def scan(dataset: ds.Dataset, columns: list[str], source: TableSource, **options: Any) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns` for the rows of `source` (its split and attacks), in file order.

    pyarrow prunes files and partitions with the filter, but rows are filtered here: pyarrow's filter and
    take kernels (pyarrow 26) misread a fixed_size_list of fixed_size_list (``noisy_logits``) whose batch
    is a slice of a larger one (a row group larger than the batch), returning other rows' noise queries.
    Such columns are rebuilt from their values (no copy) before the rows are filtered.
    """
    split, attacks = source.split, source.attacks
    expr = partition_filter(source)
    if expr is None:
        yield from dataset.to_batches(columns=columns, **options)
        return
    source = ds.FileSystemDataset(list(dataset.get_fragments(filter=expr)), dataset.schema, dataset.format,
                                  dataset.filesystem)
    read = [*columns, *(c for c in ("split", "attack") if c not in columns)]
    for batch in source.to_batches(columns=read, **options):
        yield from _keep(batch, columns, split, attacks)


def _keep(batch: pa.RecordBatch, columns: list[str], split: str | None,
          attacks: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
    """`batch` (which holds ``split`` and ``attack``) reduced to the rows of `split` and `attacks`, and to
    `columns`."""
    keep = None
    if split is not None:
        keep = pc.equal(_names(batch.column("split")), split)
    if attacks is not None:
        chosen = pc.is_in(_names(batch.column("attack")), value_set=pa.array(list(attacks), pa.string()))
        keep = chosen if keep is None else pc.and_(keep, chosen)
    if keep is not None and not pc.all(keep.fill_null(False)).as_py():
        batch = pa.RecordBatch.from_arrays([_unsliced(c) for c in batch.columns],
                                           schema=batch.schema).filter(keep.fill_null(False))
    yield batch.select(columns)


def stream_files(dataset: ds.FileSystemDataset, columns: list[str], source: TableSource,
                  batch_rows: int) -> Iterator[pa.RecordBatch]:
    """As `scan`, for streaming: each file of the selection is read in turn by its own buffered Parquet
    reader (bounded memory, see `_STREAM_BUFFER_BYTES`); its partition keys become constant columns and a
    column the file lacks becomes nulls (refused later by `conform`), as the dataset scanner would give them."""
    split, attacks = source.split, source.attacks
    expr = partition_filter(source)
    schema = dataset.schema
    read = [*columns, *(c for c in ("split", "attack") if c not in columns)]
    for fragment in dataset.get_fragments(filter=expr):
        keys = ds.get_partition_keys(fragment.partition_expression)
        reader = pq.ParquetFile(fragment.path, pre_buffer=False, buffer_size=_STREAM_BUFFER_BYTES,
                                page_checksum_verification=True)
        physical = [c for c in read if c in reader.schema_arrow.names]
        for batch in reader.iter_batches(batch_size=batch_rows, columns=physical, use_threads=False):
            n = batch.num_rows
            arrays = []
            for name in read:
                kind = schema.field(name).type
                if name in physical:
                    arrays.append(batch.column(name).cast(kind) if batch.column(name).type != kind
                                  else batch.column(name))
                elif name in keys:
                    arrays.append(pa.repeat(pa.scalar(keys[name], kind), n))
                else:
                    arrays.append(pa.nulls(n, kind))
            batch = pa.RecordBatch.from_arrays(arrays, schema=pa.schema([schema.field(c) for c in read]))
            yield from _keep(batch, columns, split, attacks)


def _names(column: pa.Array) -> pa.Array:
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _unsliced(column: pa.Array) -> pa.Array:
    """A fixed_size_list of fixed_size_list rebuilt from its own values (children without offsets)."""
    kind = column.type
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_fixed_size_list(kind.value_type)):
        return column
    inner = column.flatten()
    if column.null_count or inner.null_count:
        return column  # null entries are refused by `conform` anyway
    values = inner.flatten()
    return pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(values, type=kind.value_type),
                                             type=kind)


def partition_filter(source: TableSource) -> ds.Expression | None:
    """The partition filter of `source`'s selection (None: every row)."""
    expr = None
    if source.split is not None:
        expr = ds.field("split") == source.split
    if source.attacks is not None:
        in_attacks = ds.field("attack").isin(list(source.attacks))
        expr = in_attacks if expr is None else expr & in_attacks
    return expr
