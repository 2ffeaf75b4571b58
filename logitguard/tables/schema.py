"""The contract's vocabulary: schema version, column names, the metadata key, and the checks on them
(docs/tables.md). No I/O here.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import TableError


SCHEMA_VERSION = 1
METADATA_KEY = b"logitguard"
CLEAN = "clean"
REQUIRED_COLUMNS = ("sample_id", "split", "attack", "label", "logits")
OPTIONAL_COLUMNS = ("noisy_logits", "pred", "success", "linf", "l2", "features", "insen", "external_score",
                    "external_label", "flagged")
PARTITION_COLUMNS = ("split", "attack")
# Columns that may hold nulls; all others must be complete.
NULLABLE_COLUMNS = frozenset({"label", "pred", "success", "linf", "l2"})
# Per-row float vectors of a free length (F), besides the logits and noise queries.
VECTOR_COLUMNS = ("features", "insen")
TENSOR_DIMS = {"logits": "C", "noisy_logits": "K x C", "features": "F", "insen": "S"}  # per-row shapes, for messages


def parse_metadata(raw: bytes | None, where: str) -> dict[str, Any]:
    """The table metadata dict stored as JSON bytes under `METADATA_KEY` ({} when absent); `where` names the
    file in the error for bytes that are not a JSON object."""
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TableError(f"{where}: schema metadata 'logitguard' is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise TableError(f"{where}: schema metadata 'logitguard' must be a JSON object")
    return meta






def check_columns(names: set[str] | list[str]) -> None:
    """Refuse (`TableError`) a set of column names that lacks a required column or has an unknown one."""
    names = set(names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise TableError(f"missing required column(s) {missing}")
    extra = sorted(names - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS))
    if extra:
        raise TableError(
            f"unexpected column(s) {extra}; allowed: {[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS]}"
        )
