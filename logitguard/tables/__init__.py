"""The logit table: the one interface between producers and the core.

A logit table is a Parquet file, or a directory of Parquet files (hive partitions such as
``split=test/attack=pgd/`` allowed), with one row per (sample, attack). The contract is documented in
``docs/tables.md``; this package is its only implementation, one idea per module:

- `schema`: the column names, schema version and metadata key, and their checks;
- `table`: the in-memory `LogitTable` and its logit-free row keys (`RowKeys`, `RowCollector`); a fit or an
  evaluation uses every row it is given and refuses rows of several splits (`require_one_split`);
- `source`: `TableSource`, the rows of a table on disk a command reads (one split, some attacks), made once;
- `validation`: `conform`, an Arrow table in, a `LogitTable` (or a `TableError` naming column and row) out;
- `read`: whole tables, record batches, keys, columns and counts; `write`: files, partitions, batches;
- `pairing`: clean and attacked rows of one attack, matched by ``sample_id``;
- `sampling`: the sample-holdout split; `frames`: pandas conversion; `arrays`: Arrow/NumPy helpers;
- `stream`: reading a table in passes (`TableStream`, `stream_batches`); the apply commands are `logitguard.engines`.

The names below are the public API (``from logitguard.tables import read_table``); they are the very same
objects as in the submodules.
"""

from __future__ import annotations

from .arrays import distinct_values
from .validation import conform
from .frames import to_pandas
from .pairing import Pair, pair, pair_rows
from .read import (BATCH_ROWS_ENV, STREAM_BATCH_BYTES, dataset_metadata, iter_batches, noise_queries, open_dataset,
                   read_keys, read_table, row_counts, stream_batch_rows, table_columns, table_files, unreadable_error,
                   wanted_columns)
from .sampling import holdout_mask
from .schema import (CLEAN, METADATA_KEY, NULLABLE_COLUMNS, OPTIONAL_COLUMNS, PARTITION_COLUMNS, REQUIRED_COLUMNS,
                     SCHEMA_VERSION, VECTOR_COLUMNS, check_columns, parse_metadata)
from .source import TableSource
from .table import LogitTable, RowCollector, RowKeys, require_one_split
from .write import table_partitions, with_metadata, write_batches, write_parquet, write_table

__all__ = [
    "BATCH_ROWS_ENV", "CLEAN", "METADATA_KEY", "NULLABLE_COLUMNS", "OPTIONAL_COLUMNS", "PARTITION_COLUMNS",
    "REQUIRED_COLUMNS", "SCHEMA_VERSION", "STREAM_BATCH_BYTES", "VECTOR_COLUMNS", "LogitTable", "Pair",
    "RowCollector", "RowKeys", "TableSource", "check_columns", "conform", "dataset_metadata", "distinct_values",
    "holdout_mask", "iter_batches", "noise_queries", "open_dataset", "pair", "pair_rows", "parse_metadata",
    "read_keys", "read_table", "require_one_split", "row_counts", "stream_batch_rows", "table_columns",
    "table_files", "table_partitions", "to_pandas", "unreadable_error", "wanted_columns", "with_metadata",
    "write_batches", "write_parquet", "write_table"
]
