"""What the service's answers give a query attacker: robust accuracy per query attack, by what it saw.

A query attacker sees only what the deployed pipeline returns. The producer's ``square`` attack reads scores
(the model's logits and the detector's score: ``returns="scores"``), ``rays`` only the final label or the
abstention (``returns="labels"``). Measured side by side on the same samples, their gap is what returning
scores costs the defender: the robust accuracy lost because the service shows more than a label.

Torch-free at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from ..tables import CLEAN, LogitTable, require_one_split
from .threat import threat_model_table
from ..tables.threat import DEFAULT_BUDGETS, judge_draws, threat_of

__all__ = ["query_access_table"]


def query_access_table(
    table: LogitTable,
    pipelines: Mapping[str, object],
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
) -> pd.DataFrame:
    """Per pipeline x budget x query attack: what the attacker saw (``returns``), its query budget, the samples,
    robust accuracy with its 95% interval (judge draws included) and the median queries of its successes.

    Each query attack is measured alone (its partition and its judge draws beside the clean rows), with the
    threat table's rules (`threat_model_table`), so the figures are those of the query tier restricted to
    one attack. Empty when the table has no query partitions.
    """
    require_one_split(table, "query-access evaluation")
    draws = judge_draws(table.metadata, table.attacks)
    records = []
    for attack in table.attacks:
        if attack == CLEAN or attack in draws:
            continue
        entry = threat_of(table.metadata, attack)
        if entry["model"] != "query" or entry.get("target") not in pipelines:
            continue
        own = [attack, *(a for a, (parent, _) in draws.items() if parent == attack)]
        name = entry["target"]
        frame = threat_model_table(table.select(attacks=[CLEAN, *own]), {name: pipelines[name]}, budgets=budgets)
        for row in frame[(frame.pipeline == name) & (frame.threat_model == "query")].to_dict(orient="records"):
            records.append({"pipeline": name, "eps": row["eps"], "attack": entry.get("attack", attack),
                            "returns": entry.get("returns"), "query_budget": entry.get("query_budget"),
                            "samples": row["samples"], "draws": row["draws"],
                            **{k: row[k] for k in ("robust_accuracy", "robust_accuracy_low", "robust_accuracy_high")},
                            "median_queries": entry.get("median_queries")})
    columns = ["pipeline", "eps", "attack", "returns", "query_budget", "samples", "draws", "robust_accuracy",
               "robust_accuracy_low", "robust_accuracy_high", "median_queries"]
    return pd.DataFrame.from_records(records, columns=columns)


