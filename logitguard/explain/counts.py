"""Counts over a table: how often each class supports the corrector per attack, the ablation test
(lowering the supporting logits lowers the corrected true-class logit more than lowering random ones),
both streamed over a table on disk (`explain_path`), and the mean-logit histogram counts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..defenses.corrector import LogitCorrector
from ..errors import LogitguardError
from ..evaluation.evaluate import select_attacks
from ..tables import LogitTable, TableSource, require_one_split
from .attribution import check_k, network_forward, network_of, network_scores, top_supporting

if TYPE_CHECKING:
    from torch import nn


def supporting_frequencies(
    corrector: LogitCorrector | nn.Module,
    table: LogitTable,
    attacks: str | Sequence[str] | None = None,
    *,
    k: int | None = None,
    include_true: bool = False,
) -> pd.DataFrame:
    """How often each class is among the top-k supporting classes of an attack's rows (`table`: rows of one
    split, ``table.select(split="test")``).

    Returns a DataFrame indexed by class name (C rows), one column per attack (default: every attack
    of `table` but clean). Entry (c, a) = (number of `a` rows with c in their top k) / (rows × k):
    the share of the attack's top-k slots that class c holds, i.e. the share of rows in which c
    appears divided by k. Each column therefore sums to 1. The true class is left out of each row's
    ranking unless `include_true`.
    """
    attacks = select_attacks(table, [attacks] if isinstance(attacks, str) else attacks)
    net = network_of(corrector)
    num_classes = table.num_classes
    k = check_k(k, num_classes, exclude_true=not include_true)
    columns = {}
    for attack in attacks:
        rows = table.select(attacks=attack)
        scores = network_scores(net, rows.logits, rows.labels)
        top = top_supporting(scores, k, labels=None if include_true else rows.labels)
        columns[attack] = np.bincount(top.ravel(), minlength=num_classes) / top.size
    frame = pd.DataFrame(columns, index=pd.Index(table.class_names, name="class"))
    frame.columns.name = "attack"
    return frame


def top_classes_per_attack(freqs: pd.DataFrame, n: int = 3) -> dict[str, list[str]]:
    """The `n` most frequent supporting classes of each attack (column of `freqs`), most frequent first."""
    if n < 1:
        raise LogitguardError(f"n must be an integer >= 1, got {n!r}")
    return {str(attack): [str(c) for c in freqs[attack].nlargest(n).index] for attack in freqs.columns}


def ablation(
    corrector: LogitCorrector | nn.Module,
    table: LogitTable,
    attack: str,
    *,
    k: int | None = None,
    delta: float = 20.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Corrected accuracy on `attack`'s rows of `table` (of one split) before and after lowering k logits by `delta` (seed §5.2).

    Lowered per row: its top-k supporting classes, or (control) k distinct classes drawn uniformly
    with ``numpy.random.default_rng(seed)``. The true class is excluded from both: it is the top
    supporting class of most rows, so lowering it would measure nothing but the loss of its own
    logit, and the control must draw from the same candidates to be a fair baseline. How often the
    true class would otherwise be among the top k is reported as ``true_in_top_k``.

    Returns a dict: ``attack``, ``rows``, ``k``, ``delta``, ``accuracy`` (unchanged rows),
    ``accuracy_supporting_lowered``, ``accuracy_random_lowered`` and ``true_in_top_k``.
    """
    _check_delta(delta)
    select_attacks(table, [attack])
    rows = table.select(attacks=attack)
    k = check_k(k, table.num_classes, exclude_true=True)
    tally = _Tally(table.num_classes, k, delta, seed)
    tally.add(network_of(corrector), rows.logits, rows.labels)
    return tally.ablation(attack)


def _check_delta(delta: float) -> None:
    if not np.isfinite(delta) or delta <= 0:
        raise LogitguardError(f"delta must be a finite number > 0, got {delta!r}")


class _Tally:
    """Counts behind one attack's supporting frequencies and `ablation`, added batch by batch.

    The control's random classes come from one generator drawing (rows, C) uniforms row after row, so rows
    added in several batches draw exactly what one call on all of them would.
    """

    def __init__(self, num_classes: int, k: int, delta: float, seed: int) -> None:
        self.k, self.delta = k, delta
        self.rng = np.random.default_rng(seed)
        self.slots = np.zeros(num_classes, dtype=np.int64)  # how often each class is a supporting class
        self.rows = 0
        self.correct = {"accuracy": 0, "accuracy_supporting_lowered": 0, "accuracy_random_lowered": 0}
        self.true_in_top_k = 0

    def add(self, net: nn.Module, logits: np.ndarray, labels: np.ndarray) -> None:
        n, num_classes = logits.shape
        k = self.k
        scores = network_scores(net, logits, labels)
        supporting = top_supporting(scores, k, labels=labels)
        self.slots += np.bincount(supporting.ravel(), minlength=num_classes)
        true_rank = (scores > scores[np.arange(n), labels][:, None]).sum(axis=1)  # classes scoring above it
        self.true_in_top_k += int((true_rank < k).sum())
        del scores
        draws = self.rng.random((n, num_classes))
        draws[np.arange(n), labels] = np.inf  # never drawn: the k smallest of the rest are a uniform k-subset
        random = np.argpartition(draws, k - 1, axis=1)[:, :k]
        del draws
        for name, lowered in (("accuracy", None), ("accuracy_supporting_lowered", supporting),
                              ("accuracy_random_lowered", random)):
            z = np.array(logits)
            if lowered is not None:
                np.put_along_axis(z, lowered, np.take_along_axis(z, lowered, axis=1) - self.delta, axis=1)
            self.correct[name] += int((network_forward(net, z).argmax(axis=1) == labels).sum())
        self.rows += n

    def frequencies(self) -> np.ndarray:
        return self.slots / (self.rows * self.k)

    def ablation(self, attack: str) -> dict[str, Any]:
        n = self.rows
        return {"attack": attack, "rows": int(n), "k": self.k, "delta": float(self.delta),
                **{name: count / n for name, count in self.correct.items()},
                "true_in_top_k": self.true_in_top_k / n}


def explain_path(
    corrector: LogitCorrector | nn.Module,
    path: TableSource | str | os.PathLike,
    attacks: str | Sequence[str] | None = None,
    *,
    k: int | None = None,
    delta: float = 20.0,
    seed: int = 0,
    batch_rows: int | None = None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """`supporting_frequencies` and one `ablation` per attack for the rows of `path` (a `TableSource` of one
    split, ``TableSource(path, split="test")``, or a path), streamed in one pass.

    Returns (frequencies: classes x attacks, ablations: one dict per attack, in the frequencies' column
    order), equal to ``supporting_frequencies(corrector, read_table(path), attacks, k=k)`` and
    ``[ablation(corrector, table, a, k=k, delta=delta, seed=seed) for a in …]``.
    Memory depends on the batch size, not on the table.
    """
    from ..tables.stream import stream_batches
    from ..tables import read_keys

    _check_delta(delta)
    keys = read_keys(path)
    attacks = select_attacks(keys, [attacks] if isinstance(attacks, str) else attacks)
    net = network_of(corrector)
    num_classes = keys.num_classes
    k = check_k(k, num_classes, exclude_true=True)
    tallies = {attack: _Tally(num_classes, k, delta, seed) for attack in attacks}
    for batch in stream_batches(path, attacks=attacks, batch_rows=batch_rows):
        for attack in dict.fromkeys(batch.attack):
            rows = batch.attack == attack
            every = rows.all()
            tallies[attack].add(net, batch.logits if every else batch.logits[rows],
                                batch.labels if every else batch.labels[rows])
    frame = pd.DataFrame({a: t.frequencies() for a, t in tallies.items()},
                         index=pd.Index(keys.class_names, name="class"))
    frame.columns.name = "attack"
    return frame, [tallies[a].ablation(a) for a in frame.columns]


def mean_logit_counts(table: LogitTable, *, bins: int | Sequence[float] = 30) -> pd.DataFrame:
    """Histogram counts of each row's mean logit per attack, clean included (seed Figure 1; drawn by
    `logitguard.report.plots.mean_logit_histogram`).

    All attacks share one set of bin edges (`numpy.histogram_bin_edges` over the rows of `table`, of one
    split; or the edges given as `bins`). Returns a DataFrame indexed by bin centre (``mean_logit``), one
    column of counts per attack; each column sums to the attack's row count when `bins` is a number. The edges
    are in ``frame.attrs["bin_edges"]``.
    """
    if isinstance(bins, (int, np.integer)) and bins < 1:
        raise LogitguardError(f"bins must be an integer >= 1 or a sequence of edges, got {bins!r}")
    require_one_split(table, "mean-logit histogram")
    means = table.logits.mean(axis=1, dtype=np.float64)
    edges = np.histogram_bin_edges(means, bins)
    counts = {attack: np.histogram(means[table.attack == attack], edges)[0] for attack in table.attacks}
    frame = pd.DataFrame(counts, index=pd.Index((edges[:-1] + edges[1:]) / 2, name="mean_logit"))
    frame.columns.name = "attack"
    frame.attrs["bin_edges"] = edges
    return frame
