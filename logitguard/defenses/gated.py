"""Gated defense: detect, then act on what the detector flags.

A corrector alone pays for robustness with clean accuracy (it re-labels every row). Gating keeps the
model's own argmax on rows the detector passes; what happens to a flagged row is the `on_flag` policy:

- ``"correct"``: the corrector's label (the seed papers' detect-then-correct);
- ``"reject"``: `ABSTAIN` (-1), no label at all;
- ``"agree"``: the model's argmax when the corrector agrees with it, else `ABSTAIN`. It never emits a
  label the model did not give, so an attacker who makes the detector fire on a row the model still gets
  right cannot turn that right answer into a wrong one through the corrector.

How abstentions are counted (a rejected attacked row is defended, a rejected clean row is an error,
coverage beside accuracy) is stated once, in docs/threat-models.md.

This module stays free of torch at import: detectors and correctors are loaded lazily.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from ..errors import LogitguardError
from .estimator import check_logits
from .decision import ABSTAIN, Decision, flag
from .math.gate import ON_FLAG, gate
from ..tables import LogitTable, conform

if TYPE_CHECKING:
    from .detectors import Detector


__all__ = ["ON_FLAG", "Corrector", "GatedDefense", "as_corrector", "check_policy", "load_corrector"]


@runtime_checkable
class Corrector(Protocol):
    """Anything that re-labels rows: `LogitCorrector`, `SVMCorrector`, `OddsCorrector`. Each also says whether
    `predict` reads noise queries (``needs_noise``; not a protocol member, so `isinstance` never evaluates it)."""

    def predict(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> np.ndarray: ...




def check_policy(has_detector: bool, has_corrector: bool, on_flag: str) -> None:
    """Raise `LogitguardError` unless (detector?, corrector?, `on_flag`) makes a pipeline.

    Allowed: no detector and no corrector with ``"correct"`` (the bare model); a corrector alone with
    ``"correct"`` or ``"agree"`` (every row counts as flagged); a detector alone with ``"reject"``; a
    detector and a corrector with any policy.
    """
    if on_flag not in ON_FLAG:
        raise LogitguardError(f"unknown on_flag policy {on_flag!r}; choose from {', '.join(ON_FLAG)}")
    if not has_detector and not has_corrector:
        if on_flag != "correct":
            raise LogitguardError(f"on_flag={on_flag!r} needs a detector or a corrector; "
                                  "a pipeline with neither is the bare model")
    elif not has_detector and on_flag == "reject":
        raise LogitguardError("on_flag='reject' without a detector would reject every row; add a detector")
    elif not has_corrector and on_flag != "reject":
        raise LogitguardError(f"on_flag={on_flag!r} needs a corrector; with a detector alone use on_flag='reject'")


class GatedDefense:
    """Flagged rows are corrected, rejected or kept on agreement (`on_flag`); others keep the model's argmax.

    Parameters
    ----------
    detector : a fitted `Detector`, or None: every row counts as flagged (a corrector alone).
    corrector : a `Corrector` (``predict(logits, noisy_logits) -> labels``): a `LogitCorrector`, an
        `SVMCorrector` or an `OddsCorrector` (an odds test's own rule); None only with
        ``on_flag="reject"``, or with no detector either (the bare model).
    on_flag : ``"correct"`` (default), ``"reject"`` or ``"agree"``; see the module docstring.
    """

    def __init__(self, detector: Detector | None, corrector: Corrector | None, *, on_flag: str = "correct") -> None:
        check_policy(detector is not None, corrector is not None, on_flag)
        column = getattr(detector, "input_column", None)
        if column is not None:
            raise LogitguardError(f"a gated defense decides from logits (and noise queries) alone; the "
                                  f"{detector.kind!r} detector also reads the {column!r} column, which a deployed "
                                  f"remote model does not return: use it with `detect` / score_table instead")
        self.detector = detector
        self.corrector = as_corrector(corrector) if corrector is not None else None
        self.on_flag = on_flag

    @property
    def needs_noise(self) -> bool:
        """Whether `check` needs noise queries (a detector or corrector reads them)."""
        return any(part is not None and part.needs_noise for part in (self.detector, self.corrector))

    def check(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> Decision:
        """Decide every row of logits (N, C) (and noise queries (N, K, C) when a part needs them).

        Without a detector every row is flagged (the corrector acts on all of them); the bare model
        (neither) flags nothing. The corrector runs on flagged rows only.
        """
        logits, noisy = check_logits(logits, noisy_logits, needs_noise=self.needs_noise)
        model_label = logits.argmax(axis=1).astype(np.int64)
        score = np.full(len(logits), np.nan)
        if self.detector is not None:
            score = self.detector.score_samples(logits, noisy)
            flagged = flag(score, self.detector.threshold_)  # the one rule: a NaN score is flagged
        else:
            flagged = np.full(len(logits), self.corrector is not None)
        corrected = None
        if flagged.any() and self.on_flag != "reject":  # the corrector runs on flagged rows only
            rows = slice(None) if flagged.all() else flagged
            corrected = model_label.copy()
            corrected[flagged] = self.corrector.predict(logits[rows], None if noisy is None else noisy[rows])
        labels = gate(model_label, flagged, corrected, self.on_flag) if flagged.any() else model_label.copy()
        return Decision(model_label, flagged, score, labels)

    def predict(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> np.ndarray:
        """Defended labels (N,) int64: argmax on passed rows, the policy's label on flagged ones (`ABSTAIN` = rejected)."""
        return self.check(logits, noisy_logits).label

    def check_table(self, table: LogitTable) -> Decision:
        """`check` on every row of `table`."""
        noisy = table.noisy_logits if self.needs_noise else None
        if self.needs_noise and noisy is None:
            raise LogitguardError("this defense needs noise queries (column 'noisy_logits')")
        return self.check(table.logits, noisy)

    def predict_table(self, table: LogitTable) -> np.ndarray:
        """`predict` on every row of `table` (the defense protocol of `evaluate` and `threat_model_table`)."""
        return self.check_table(table).label

    def describe(self) -> dict:
        """JSON-ready description: detector (kind, params, threshold) or None, corrector class or None, on_flag."""
        detector = None
        if self.detector is not None:
            detector = {"kind": self.detector.kind, **self.detector.get_params(),
                        "threshold": self.detector.threshold_}
        corrector = None if self.corrector is None else type(self.corrector).__name__
        return {"detector": detector, "corrector": corrector, "on_flag": self.on_flag}

    def defend_table(self, table: LogitTable) -> LogitTable:
        """`table` with ``pred`` = the defended label and ``flagged`` = the detector's verdict.

        A rejected row's ``pred`` is stored as null (read back as `ABSTAIN`, -1, by ``table.column("pred")``),
        so the contract's ``0 <= pred < C`` holds for every reader. Logits, labels and noise queries are
        kept unchanged; the metadata records the defense (``defended_by``, with ``on_flag``). The rows go
        through the one apply path (`logitguard.defenses.apply.apply_batch`), as in every engine.
        """
        from .apply import apply_batch

        return apply_batch(self, table).output

    def apply_decision(self, table: LogitTable, decision: Decision) -> LogitTable:
        """`defend_table` with the `Decision` already taken for `table`'s rows (`check_table`)."""
        labels, flagged = decision.label, decision.flagged
        arrow = table.arrow.drop_columns([c for c in ("pred", "flagged") if c in table.columns])
        pred = pa.array(labels, pa.int64(), mask=labels == ABSTAIN)
        arrow = arrow.append_column("pred", pred).append_column("flagged", pa.array(flagged))
        return conform(arrow, metadata={**table.metadata, "defended_by": self.describe()})


def as_corrector(estimator: Any, where: str = "") -> Corrector:
    """`estimator` as a corrector: an odds test is used through its correction rule (`OddsCorrector`);
    any other detector is refused."""
    from .detectors import Detector
    from .detectors.odds import OddsCorrector, OddsTest

    if isinstance(estimator, OddsTest):
        return OddsCorrector(estimator)
    if isinstance(estimator, Detector):
        raise LogitguardError(f"{where}a {estimator.kind!r} detector cannot correct labels; use a corrector, "
                              "an SVM or an odds detector")
    return estimator


def load_corrector(path: str | os.PathLike) -> Corrector:
    """Any saved corrector: a `LogitCorrector`, an `SVMCorrector`, or an odds-test detector file (used
    through its correction rule, as an `OddsCorrector`)."""
    from .estimator import load_estimator

    return as_corrector(load_estimator(path, what="corrector"), f"{path}: ")
