"""Gated defense: detect, then correct only what the detector flags.

A corrector alone pays for robustness with clean accuracy (it re-labels every row). Gating keeps the
model's own argmax on rows the detector passes, so clean accuracy falls only by the detector's false
positives that the corrector then gets wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from ._io import read_header
from .detectors import Detector
from .errors import LogitguardError
from .tables import LogitTable, conform


class Corrector(Protocol):
    def predict_table(self, table: LogitTable) -> np.ndarray: ...


class GatedDefense:
    """Flagged rows get `corrector`'s label, others keep the model's argmax.

    `corrector` is anything with ``predict_table(table) -> labels``: a `LogitCorrector`, an
    `SVMCorrector` or an `OddsTest` (its own correction rule).
    """

    def __init__(self, detector: Detector, corrector: Corrector) -> None:
        self.detector = detector
        self.corrector = corrector

    def predict_table(self, table: LogitTable) -> np.ndarray:
        """Labels (N,): argmax, replaced by the corrector's label where the detector flags the row."""
        return self.labels_and_flags(table)[0]

    def labels_and_flags(self, table: LogitTable) -> tuple[np.ndarray, np.ndarray]:
        """Defended labels (N,) int64 and the detector's flags (N,) bool."""
        flagged = self.detector.predict(table)
        labels = table.logits.argmax(axis=1)
        if flagged.any():
            labels[flagged] = self.corrector.predict_table(table.take(flagged))
        return labels, flagged

    def defend_table(self, table: LogitTable) -> LogitTable:
        """`table` with ``pred`` = the defended label and ``flagged`` = the detector's verdict.

        Logits, labels and noise queries are kept unchanged; the metadata records the defense.
        """
        labels, flagged = self.labels_and_flags(table)
        arrow = table.arrow.drop_columns([c for c in ("pred", "flagged") if c in table.columns])
        arrow = arrow.append_column("pred", pa.array(labels, pa.int64())).append_column("flagged", pa.array(flagged))
        metadata = {**table.metadata, "defended_by": {
            "detector": {"kind": self.detector.kind, **self.detector.get_params(), "threshold": self.detector.threshold_},
            "corrector": type(self.corrector).__name__}}
        return conform(arrow, metadata=metadata)


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

