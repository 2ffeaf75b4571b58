"""The one apply path: any fitted defense on one batch of rows gives a `Decision` per row, with the row keys.

Every engine only moves batches through `apply_batch` (a `LogitTable` batch) or `decide` (arrays): the
in-memory `GatedDefense.defend_table`, the streamed commands (`logitguard.engines.stream`), the Ray actors
(`logitguard.engines.ray`) and the HTTP service (`logitguard.serve`). What a defense may be:

- None: the bare model (flags nothing, labels are the argmax);
- a `Detector`: scores and flags (`flag`: score above the threshold, or not a number); labels stay the argmax;
- a corrector (`LogitCorrector`, `SVMCorrector`, `OddsCorrector`, an odds test): every row counts as flagged and
  gets the corrector's label; a `LogitCorrector`'s output table holds its corrected logits;
- a `GatedDefense` (detector, corrector, ``on_flag`` policy), or a `Guard` (a gated defense and the C and K it
  expects: a batch of other classes or noise queries is refused before anything is decided).

The row-level contract (columns, types, C, K) is checked when a batch is read (`logitguard.tables.conform`);
what this module adds is the defense's own demands (noise queries, an input column, a guard's C and K).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..errors import LogitguardError
from ..tables import LogitTable, RowKeys
from .decision import ABSTAIN, Decision, flag
from .detectors.base import Detector
from .corrector import LogitCorrector
from .gated import Corrector, GatedDefense, as_corrector
from .guard import Guard

__all__ = ["Applied", "apply_batch", "decide", "defense_kind", "needs_noise", "output_columns"]

NORMS = ("linf", "l2")  # per-row perturbation sizes kept beside a decision (the summary's median norms)


class Applied(NamedTuple):
    """What `apply_batch` returns for a batch of N rows."""

    keys: RowKeys  # the rows' keys and labels; values: the Decision's fields (N,) and linf / l2 where present
    decision: Decision  # (N,) arrays: model_label, flagged, score, label (ABSTAIN where rejected)
    output: LogitTable | None  # the rows a writing command writes (corrected or defended); None for a detector


def defense_kind(defense: Any) -> str:
    """``model`` (None), ``detector``, ``corrector`` (a `LogitCorrector`: corrected logits), ``gated`` (a
    `GatedDefense`, or any other corrector taken as one) or ``guard``."""
    if defense is None:
        return "model"
    if isinstance(defense, Detector):
        return "detector"
    if isinstance(defense, GatedDefense):
        return "gated"
    if isinstance(defense, Guard):
        return "guard"
    if isinstance(defense, LogitCorrector):
        return "corrector"
    if isinstance(defense, Corrector):
        return "gated"
    raise LogitguardError(f"cannot apply a {type(defense).__name__}: expected a detector, a corrector, a gated "
                          "defense or a guard")


def _gated(defense: Any) -> GatedDefense:
    """A corrector other than a `LogitCorrector` as the gated defense it is alone (every row flagged)."""
    return defense if isinstance(defense, GatedDefense) else GatedDefense(None, as_corrector(defense))


def needs_noise(defense: Any) -> bool:
    """Whether `defense` reads noise queries (``noisy_logits``)."""
    kind = defense_kind(defense)
    if kind == "guard":
        return defense.num_queries > 0
    return kind != "model" and defense.needs_noise


def output_columns(defense: Any, available: list[str] | tuple[str, ...]) -> list[str]:
    """The optional columns a batch needs for `apply_batch(defense, …)` out of `available`, for its
    decisions and its output: noise queries where the defense reads them, a detector's input column, the
    norms (kept in every output), and for a gated defense or a guard every column (its output keeps them)."""
    kind = defense_kind(defense)
    if kind in ("gated", "guard"):
        from ..tables import OPTIONAL_COLUMNS

        return [c for c in OPTIONAL_COLUMNS if c in available]
    wanted = [*NORMS, *(["noisy_logits"] if needs_noise(defense) else [])]
    if kind == "detector" and defense.input_column is not None:
        wanted.append(defense.input_column)
    return [c for c in wanted if c in available]


def check_input(defense: Any, available: list[str] | tuple[str, ...]) -> None:
    """Refuse a table (its column names `available`) that lacks what `defense` reads, before any row is read."""
    kind = defense_kind(defense)
    if needs_noise(defense) and "noisy_logits" not in available:
        what = ("this guard" if kind == "guard" else f"the {defense.kind!r} detector" if kind == "detector"
                else "this defense")
        raise LogitguardError(f"{what} needs noise queries (column 'noisy_logits')")
    if kind == "detector" and defense.input_column is not None and defense.input_column not in available:
        raise LogitguardError(defense._missing_column())


def decide(defense: Any, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> Decision:
    """The `Decision` of `defense` for logits (N, C) and, where it reads them, noise queries (N, K, C).

    A detector with an input column needs the table: use `apply_batch`. Raises `LogitguardError` for a
    wrong C or K (a guard's), missing noise queries, NaN or infinite values."""
    kind = defense_kind(defense)
    if kind == "guard":
        return defense.check(logits, noisy_logits)
    if kind == "gated":
        return _gated(defense).check(logits, noisy_logits)
    logits = np.asarray(logits)
    model_label = logits.argmax(axis=1).astype(np.int64)
    if kind == "model":
        return Decision(model_label, np.zeros(len(logits), dtype=bool), np.full(len(logits), np.nan), model_label)
    if kind == "detector":
        score = np.asarray(defense.score_samples(logits, noisy_logits), dtype=np.float64)
        return Decision(model_label, flag(score, defense.threshold_), score, model_label.copy())
    label = np.asarray(defense.predict(logits, noisy_logits), dtype=np.int64)
    return Decision(model_label, np.ones(len(logits), dtype=bool), np.full(len(logits), np.nan), label)


def apply_batch(defense: Any, batch: LogitTable, *, output: bool = True) -> Applied:
    """`defense` on every row of `batch`: the rows' keys, the `Decision`, and (with `output`) the table a
    writing command writes: the corrected table (``correct``), or `batch` with ``pred`` (null where rejected)
    and ``flagged`` (``defend``, ``guard apply``); None for the bare model and a detector."""
    kind = defense_kind(defense)
    noisy = batch.noisy_logits if needs_noise(defense) else None
    if needs_noise(defense) and noisy is None:
        check_input(defense, batch.columns)
    out: LogitTable | None = None
    if kind == "guard":
        defense.check_schema(batch)
        decision = defense.check(batch.logits, noisy)
        if output:
            out = defense.defense.apply_decision(batch, decision)
    elif kind == "gated":
        gated = _gated(defense)
        decision = gated.check(batch.logits, noisy)
        if output:
            out = gated.apply_decision(batch, decision)
    elif kind == "corrector":
        corrected = defense.correct_table(batch)
        label = corrected.column("pred")
        decision = Decision(batch.logits.argmax(axis=1).astype(np.int64), np.ones(len(batch), dtype=bool),
                            np.full(len(batch), np.nan), label)
        out = corrected if output else None
    elif kind == "detector":
        check_input(defense, batch.columns)
        score = np.asarray(defense.score_table(batch), dtype=np.float64)
        model_label = batch.logits.argmax(axis=1).astype(np.int64)
        decision = Decision(model_label, flag(score, defense.threshold_), score, model_label.copy())
    else:
        decision = decide(None, batch.logits)
    norms = {name: batch.column(name) for name in NORMS if name in batch.columns}
    return Applied(RowKeys.of(batch, **decision._asdict(), **norms), decision, out)


def rejected(decision: Decision) -> np.ndarray:
    """(N,) bool: the rows the defense gave no label."""
    return decision.label == ABSTAIN
