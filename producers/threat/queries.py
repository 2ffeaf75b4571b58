"""Export the ``query`` threat model: attacks that only query each pipeline as deployed.

Each pipeline of a manifest is deployed behind its mirror (decisions equal to the core's) and attacked by the
query attacks (`producers.attacks.QUERY_ATTACK_NAMES`: ``square`` sees scores, ``rays`` labels only) with a
query budget per sample. Partitions are ``query.<pipeline>.<attack>.e<ε·255>``; their threat entry records
what the service returned and how many queries each success took:

    {"model": "query", "target": "ln-reject", "attack": "square", "eps": 0.0627, "returns": "scores",
     "query_budget": 1000, "queries": [12, -1, ...], "median_queries": 41.0}

``queries`` is aligned with the partition's rows sorted by sample_id (-1 = not broken), ``median_queries`` is
over the broken ones (null when none). A service that returns scores can be attacked both ways, so running
``square`` and ``rays`` on one pipeline shows what returning scores costs the defender.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from logitguard.defenses.pipelines import PipelineSpec
from logitguard.tables import METADATA_KEY, LogitTable
from logitguard.tables.threat import DEFAULT_BUDGETS

from ..attacks import QUERY_ATTACK_NAMES, make_attack
from ..data.datasets import ImageSet
from ..data.noise import NoiseRecipe
from ..errors import ProducerError
from producers.export.execute import ExportReport
from ..models.classifiers import ImageClassifier
from .export import Planned, partition_name, run_plan, run_selection
from .pipeline import load_pipeline_mirror

TIER = "query"
DEFAULT_QUERY_ATTACKS = ("square", "rays")
# Threat-entry keys that are results of the run, not settings: a rerun does not compare them.
RESULT_KEYS = ("queries", "median_queries")


def export_queries(
    model: ImageClassifier,
    data: ImageSet,
    pipelines: Mapping[str, PipelineSpec],
    *,
    out: str | Path,
    attacks: Sequence[str] = DEFAULT_QUERY_ATTACKS,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    samples: int | None = 1000,
    noise: NoiseRecipe | None,
    attack_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    metadata: Mapping[str, Any] | None = None,
    features: bool = False,
    insen: bool = False,
    judge_draws: int = 5,
    progress: bool = True,
) -> ExportReport:
    """Query-attack every pipeline at every budget with every attack; one partition each (see module).

    Samples, staging, resuming and judge draws as `producers.threat.export.export_through`. `attack_params`
    apply to every attack (``queries``, …).
    """
    unknown = sorted(set(attacks) - set(QUERY_ATTACK_NAMES))
    if not attacks or unknown:
        raise ProducerError(f"unknown query attack(s) {unknown}; known: {list(QUERY_ATTACK_NAMES)}")
    rows, base_meta = run_selection(data, budgets=budgets, judge_draws=judge_draws, samples=samples, seed=seed,
                                    noise=noise, metadata=metadata)
    out, device = Path(out), torch.device(device)
    model = model.to(device).eval()
    plan = []
    for key, spec in pipelines.items():
        mirror = load_pipeline_mirror(spec)
        for eps in budgets:
            for attack in attacks:
                name = partition_name(TIER, key, attack, eps)
                try:
                    attacker = make_attack(attack, model, defense=mirror, noise=noise, eps=eps,
                                           batch_size=batch_size, device=device, **dict(attack_params or {}))
                except (TypeError, ValueError) as exc:
                    raise ProducerError(f"attack {attack}: {exc}") from None
                threat = {"model": TIER, "target": key, "attack": attack, "eps": eps, "returns": attacker.returns,
                          "query_budget": attacker.queries}
                draws = judge_draws if mirror.needs_noise else 1
                if draws > 1:
                    threat["judge_draws"] = draws
                meta = {**base_meta, "attacks": {name: {**attacker.params(), "attack": attack}},
                        "threat": {name: threat}}
                plan.append(Planned(name, attacker, meta, draws, spec if draws > 1 else None,
                                    _query_record(attacker, meta, name, len(rows)),
                                    recognise=lambda meta, files, name=name: _with_results_of(meta, name, files),
                                    rows=rows))
    for item in plan:
        item.attacker.take_queries()  # nothing left over from another run
    return run_plan(plan, out=out, tier=TIER, data=data, seed=seed, model=model, noise=noise,
                    features=features, insen=insen, batch_size=batch_size, device=device, progress=progress)


def _query_record(attacker: Any, meta: dict[str, Any], name: str, n: int):
    """The query attack's `finish`: the queries each sample took into the partition's threat entry."""
    return lambda table, broken: LogitTable(table.arrow, _record(meta, name, attacker.take_queries(), n))


def query_summary(queries: np.ndarray) -> dict[str, Any]:
    """The threat entry's results: ``queries`` (list, -1 = not broken) and ``median_queries`` of the broken."""
    queries = np.asarray(queries, dtype=np.int64)
    broken = queries[queries > 0]
    return {"queries": queries.tolist(), "median_queries": float(np.median(broken)) if len(broken) else None}


def _record(meta: dict[str, Any], name: str, queries: np.ndarray, n: int) -> dict[str, Any]:
    """`meta` with the run's query counts in the threat entry of `name`."""
    if len(queries) != n:
        raise ProducerError(f"{name}: the attack reported {len(queries)} query counts for {n} rows")
    return {**meta, "threat": {name: {**meta["threat"][name], **query_summary(queries)}}}


def _with_results_of(meta: dict[str, Any], name: str, files: Sequence[Path]) -> dict[str, Any]:
    """`meta` with the results of the first existing file among `files` in the threat entry of `name` when its
    settings match (so a finished or staged partition is recognised: results are not settings)."""
    planned = meta["threat"][name]
    for file in files:
        if not file.exists():
            continue
        try:
            theirs = json.loads((pq.read_schema(file).metadata or {}).get(METADATA_KEY) or b"{}")
        except (OSError, ValueError):
            continue  # classify reports an unreadable file
        entry = (theirs.get("threat") or {}).get(name) or {}
        if {k: v for k, v in entry.items() if k not in RESULT_KEYS} == json.loads(json.dumps(planned)):
            return {**meta, "threat": {name: {**planned, **{k: entry[k] for k in RESULT_KEYS if k in entry}}}}
    return meta
