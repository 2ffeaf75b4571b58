"""The one report path: what ``inspect``, ``correct``, ``detect``, ``defend`` and ``guard apply`` report, from
the per-row decisions an engine collected (`RowKeys` whose values are the `Decision` fields of
`logitguard.defenses.apply.apply_batch`: ``model_label``, ``flagged``, ``score``, ``label``; and ``linf`` /
``l2`` where the table has them). Every engine (streamed, Ray) hands its rows here, so their reports agree
by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..defenses.decision import ABSTAIN
from ..tables import CLEAN, RowKeys, require_one_split
from ..tables.threat import NO_DEFENSE

__all__ = ["corrected_summary", "defense_report", "detection_report", "table_summary"]


def table_summary(rows: RowKeys, *, noise_queries: Sequence[int] | None = None) -> dict[str, Any]:
    """`summarize` of the table the rows came from (``model_label``: the argmax of its logits)."""
    from ..report.summary import summarize_rows

    return summarize_rows(rows, noise_queries=noise_queries)


def corrected_summary(rows: RowKeys) -> dict[str, Any]:
    """`summarize` of the corrected table: its argmax is the corrector's label (``label``); no noise queries."""
    values = {k: v for k, v in rows.values.items() if k in ("linf", "l2")}
    return table_summary(RowKeys(rows.split, rows.attack, rows.sample_id, rows.labels, rows.metadata,
                                 {"model_label": rows.values["label"], **values}))


def _rates(rows: RowKeys, mask: np.ndarray) -> dict[str, float]:
    """Attack -> share of its rows where `mask` (N,) bool holds, attacks in table order (clean first)."""
    return {a: float(mask[rows.attack == a].mean()) for a in rows.attacks}


def _compared(rows: RowKeys) -> bool:
    """Labelled rows with clean rows and at least one attack: what accuracy and detection metrics need."""
    return rows.has_labels and CLEAN in rows.attacks and len(rows.attacks) > 1


def detection_report(rows: RowKeys, kind: str, threshold: float) -> dict[str, Any]:
    """``flagged_rate`` (attack -> share flagged) and ``metrics`` (`detection_table`'s records, for rows of one
    split; None when the rows are unlabelled or lack clean rows or attacks)."""
    from ..evaluation.evaluate import detection_records

    metrics = None
    if _compared(rows):
        require_one_split(rows, "detection metrics")
        metrics = detection_records(rows, {kind: rows.values["score"]}, {kind: threshold},
                                    [a for a in rows.attacks if a != CLEAN])
    return {"flagged_rate": _rates(rows, rows.values["flagged"]), "metrics": metrics}


def defense_report(rows: RowKeys) -> dict[str, Any]:
    """``flagged_rate`` and ``rejected_rate`` (attack -> share of rows) and ``evaluation`` (`evaluate` of the
    defense, named ``gated``, beside the bare model on the ``test`` rows when there are some, else on the rows'
    one split; None when the rows are unlabelled, lack clean rows or attacks, or hold several splits but no
    ``test`` one)."""
    from ..evaluation.evaluate import evaluation_records, select_attacks

    evaluation = None
    chosen = rows.select(split="test") if _compared(rows) and "test" in rows.splits else rows
    if _compared(rows) and len(chosen.splits) == 1:
        attacks = select_attacks(chosen, None)
        evaluation = evaluation_records(
            chosen, {NO_DEFENSE: chosen.values["model_label"], "gated": chosen.values["label"]}, attacks)
    return {"flagged_rate": _rates(rows, rows.values["flagged"]),
            "rejected_rate": _rates(rows, rows.values["label"] == ABSTAIN),
            "evaluation": evaluation}
