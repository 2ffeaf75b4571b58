"""logitguard: detect, correct and explain adversarial attacks from a classifier's logits alone.

The core reads only logit tables (see `logitguard.tables` and docs/tables.md); it never touches images,
models or attacks, and imports neither torchvision nor the `producers` package. Torch is needed only to
train correctors (the ``train`` extra); applying saved defenses needs NumPy, pandas and pyarrow.

The table names below are imported on first use (PEP 562), so ``import logitguard`` and
``logitguard --help`` stay fast. The packages and what each holds: docs/architecture.md. The module names
from before that layout (``logitguard.corrector``, ``logitguard.detectors``, …) still import, as the very
same modules (`logitguard._compat`).
"""

from __future__ import annotations

from typing import Any

from ._compat import CORE_ALIASES, install
from .errors import LogitguardError, TableError

install(CORE_ALIASES)

__version__ = "0.1.0"

_FROM_TABLES = frozenset({"LogitTable", "Pair", "pair", "read_table", "to_pandas", "write_table"})

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


def __getattr__(name: str) -> Any:
    if name in _FROM_TABLES or name == "tables":
        import importlib

        tables = importlib.import_module(".tables", __name__)  # not `from . import`: that would call us again
        return tables if name == "tables" else getattr(tables, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_TABLES})
