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

from ..report.summary import render_table
from ..tables import CLEAN, LogitTable
from .intervals import with_interval
from .threat import threat_model_table
from ..tables.threat import DEFAULT_BUDGETS, format_budget, judge_draws, threat_of

__all__ = ["format_query_access", "query_access_table"]


def query_access_table(
    table: LogitTable,
    pipelines: Mapping[str, object],
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    split: str | None = "test",
) -> pd.DataFrame:
    """Per pipeline x budget x query attack: what the attacker saw (``returns``), its query budget, the samples,
    robust accuracy with its 95% interval (judge draws included) and the median queries of its successes.

    Each query attack is measured alone (its partition and its judge draws beside the clean rows), with the
    threat table's rules (`threat_model_table`), so the figures are those of the query tier restricted to
    one attack. Empty when the table has no query partitions.
    """
    if split is not None:
        table = table.select(split=split)
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
        frame = threat_model_table(table.select(attacks=[CLEAN, *own]), {name: pipelines[name]}, budgets=budgets,
                                   split=None)
        for row in frame[(frame.pipeline == name) & (frame.threat_model == "query")].to_dict(orient="records"):
            records.append({"pipeline": name, "eps": row["eps"], "attack": entry.get("attack", attack),
                            "returns": entry.get("returns"), "query_budget": entry.get("query_budget"),
                            "samples": row["samples"], "draws": row["draws"],
                            **{k: row[k] for k in ("robust_accuracy", "robust_accuracy_low", "robust_accuracy_high")},
                            "median_queries": entry.get("median_queries")})
    columns = ["pipeline", "eps", "attack", "returns", "query_budget", "samples", "draws", "robust_accuracy",
               "robust_accuracy_low", "robust_accuracy_high", "median_queries"]
    return pd.DataFrame.from_records(records, columns=columns)


def format_query_access(access: pd.DataFrame) -> str:
    """Plain text: per pipeline x budget, each query attack's robust accuracy, and the cost of returning scores
    (labels-only minus scores figure, in points) where both were measured."""
    if access.empty:
        return "Query attackers: none in this table (logitguard-produce attack-defenses --tier query)"
    lines = []
    for (name, eps), group in access.groupby(["pipeline", "eps"], sort=False):
        by = {r["returns"]: r for r in group.to_dict(orient="records")}
        cost = "-"
        if "scores" in by and "labels" in by:
            cost = f"{100 * (by['labels']['robust_accuracy'] - by['scores']['robust_accuracy']):+.1f}"
        for r in group.to_dict(orient="records"):
            median = "-" if r["median_queries"] is None else f"{r['median_queries']:g}"
            lines.append([name, format_budget(eps), r["attack"], str(r["returns"]), str(r["query_budget"]),
                          str(r["samples"]), str(r["draws"]), with_interval(r, "robust_accuracy"), median, cost])
    headers = ["pipeline", "eps", "attack", "sees", "queries", "samples", "draws", "robust", "median queries",
               "scores cost (points)"]
    return "\n".join(["What a query attacker gets from the service's answers (each query attack alone)",
                      *render_table(headers, lines, left=4),
                      "(scores cost: labels-only robust accuracy minus the scores attacker's, same samples)"])
