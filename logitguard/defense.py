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
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa

from ._io import read_header
from .errors import LogitguardError
from .metrics import ABSTAIN
from .tables import LogitTable, conform

if TYPE_CHECKING:
    from .detectors import Detector

ON_FLAG = ("correct", "reject", "agree")

__all__ = ["ABSTAIN", "ON_FLAG", "Corrector", "GatedDefense", "check_policy", "load_corrector"]


class Corrector(Protocol):
    def predict_table(self, table: LogitTable) -> np.ndarray: ...


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
    corrector : anything with ``predict_table(table) -> labels``: a `LogitCorrector`, an `SVMCorrector`
        or an `OddsTest` (its own correction rule); None only with ``on_flag="reject"``, or with no
        detector either (the bare model).
    on_flag : ``"correct"`` (default), ``"reject"`` or ``"agree"``; see the module docstring.
    """

    def __init__(self, detector: Detector | None, corrector: Corrector | None, *, on_flag: str = "correct") -> None:
        check_policy(detector is not None, corrector is not None, on_flag)
        self.detector = detector
        self.corrector = corrector
        self.on_flag = on_flag

    def predict_table(self, table: LogitTable) -> np.ndarray:
        """Labels (N,) int64: argmax on passed rows, the policy's label on flagged ones (`ABSTAIN` = rejected)."""
        return self.labels_and_flags(table)[0]

    def labels_and_flags(self, table: LogitTable) -> tuple[np.ndarray, np.ndarray]:
        """Defended labels (N,) int64 (`ABSTAIN` where rejected) and the flags (N,) bool.

        Without a detector every row is flagged (the corrector acts on all of them); the bare model
        (neither) flags nothing.
        """
        labels = table.logits.argmax(axis=1).astype(np.int64)
        if self.detector is not None:
            flagged = np.asarray(self.detector.predict(table), dtype=bool)
        else:
            flagged = np.full(len(table), self.corrector is not None)
        if not flagged.any():
            return labels, flagged
        if self.on_flag == "reject":
            labels[flagged] = ABSTAIN
            return labels, flagged
        subset = table if flagged.all() else table.take(flagged)
        corrected = np.asarray(self.corrector.predict_table(subset), dtype=np.int64)
        if self.on_flag == "correct":
            labels[flagged] = corrected
        else:  # agree
            labels[flagged] = np.where(corrected == labels[flagged], labels[flagged], ABSTAIN)
        return labels, flagged

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
        kept unchanged; the metadata records the defense (``defended_by``, with ``on_flag``).
        """
        labels, flagged = self.labels_and_flags(table)
        arrow = table.arrow.drop_columns([c for c in ("pred", "flagged") if c in table.columns])
        pred = pa.array(labels, pa.int64(), mask=labels == ABSTAIN)
        arrow = arrow.append_column("pred", pred).append_column("flagged", pa.array(flagged))
        return conform(arrow, metadata={**table.metadata, "defended_by": self.describe()})


def load_corrector(path: str | os.PathLike) -> Corrector:
    """Any saved corrector: a `LogitCorrector` (.pt), an `SVMCorrector` or an odds-test detector (.npz)."""
    from .corrector import LogitCorrector
    from .detectors import load_detector
    from .detectors.odds import OddsTest
    from .svm import FORMAT as SVM_FORMAT
    from .svm import SVMCorrector

    path = Path(path)
    if not path.is_file():
        raise LogitguardError(f"no such corrector file: {path}")
    header = read_header(path)
    if header is None:
        return LogitCorrector.load(path)
    if header.get("format") == SVM_FORMAT:
        return SVMCorrector.load(path)
    detector = load_detector(path)
    if not isinstance(detector, OddsTest):
        raise LogitguardError(f"{path}: a {detector.kind!r} detector cannot correct labels; use a corrector, "
                              "an SVM or an odds detector")
    return detector
