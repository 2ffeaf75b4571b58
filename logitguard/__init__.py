"""logitguard: detect, correct and explain adversarial attacks from a classifier's logits alone.

The core reads only logit tables (see `logitguard.tables` and docs/tables.md); it never touches images,
models or attacks, and imports neither torchvision nor the `producers` package.
"""

from .errors import LogitguardError, TableError
from .tables import LogitTable, Pair, pair, read_table, to_pandas, write_table

__version__ = "0.1.0"

__all__ = [
    "LogitguardError",
    "LogitTable",
    "Pair",
    "TableError",
    "pair",
    "read_table",
    "to_pandas",
    "write_table",
    "__version__",
]
