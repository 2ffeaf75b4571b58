"""The detector contract shared by every detector.

``score(table)`` returns one float per row where **higher means more likely adversarial** (scores from
papers that run the other way are negated). ``predict(table)`` flags rows whose score exceeds a
threshold calibrated on clean rows to a target false-positive rate (default 5%); the FPR reached on the
calibration rows is kept as ``achieved_fpr_``.

Files are ``.npz`` archives of plain arrays plus one JSON header, read with ``allow_pickle=False``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .._io import load_arrays, save_arrays
from ..errors import LogitguardError
from ..metrics import threshold_at_fpr
from ..tables import CLEAN, LogitTable, holdout_mask

FORMAT = "logitguard.Detector"
FORMAT_VERSION = 1
REGISTRY: dict[str, type[Detector]] = {}


class Detector:
    """Base class: subclasses set `kind`, implement `score` and, if they learn anything, `_fit`,
    `_state` and `_restore`."""

    kind: ClassVar[str]
    needs_noise: ClassVar[bool] = False
    # Supervised detectors fit their weights on most samples and calibrate the threshold on the rest:
    # a threshold set on the rows a network was trained on undershoots the FPR on new rows.
    calibration_fraction: ClassVar[float] = 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            REGISTRY[cls.kind] = cls

    def __init__(self, *, fpr: float = 0.05) -> None:
        if not 0.0 < fpr < 1.0:
            raise LogitguardError(f"fpr must be in (0, 1), got {fpr!r}")
        self.fpr = float(fpr)

    def get_params(self) -> dict[str, Any]:
        return {"fpr": self.fpr}

    # -- the contract ------------------------------------------------------------------------

    def fit(self, table: LogitTable, *, attacks: list[str] | None = None, split: str | None = "train") -> Detector:
        """Learn from the `split` rows (clean rows; supervised detectors also attacked rows of
        `attacks`, default all), then calibrate the threshold on clean rows: the same rows, or for
        supervised detectors a held-out share ``calibration_fraction`` of the samples."""
        if split is not None:
            table = table.select(split=split)
        if self.needs_noise and table.noisy_logits is None:
            raise LogitguardError(f"the {self.kind!r} detector needs noise queries (column 'noisy_logits')")
        if CLEAN not in table.attacks:
            raise LogitguardError(f"fitting a detector needs clean rows; the table has {table.attacks}")
        chosen = [a for a in table.attacks if a != CLEAN] if attacks is None else list(attacks)
        missing = [a for a in chosen if a not in table.attacks]
        if missing:
            raise LogitguardError(f"no rows for attack(s) {missing}; the table has {table.attacks}")
        held = holdout_mask(table.sample_id, self.calibration_fraction, seed=0)
        self._fit(table.take(~held) if held.any() else table, chosen)
        calibration = table.take(held) if held.any() else table
        return self.calibrate(self.score(calibration.select(attacks=CLEAN)))

    def _fit(self, table: LogitTable, attacks: list[str]) -> None:
        """Learn what the score needs (nothing for the fixed baselines)."""

    def score(self, table: LogitTable) -> np.ndarray:
        """Scores (N,) float64, higher = more likely adversarial."""
        raise NotImplementedError

    def calibrate(self, clean_scores: np.ndarray, fpr: float | None = None) -> Detector:
        """Set `threshold_` so that at most `fpr` (default `self.fpr`) of `clean_scores` exceed it."""
        fpr = self.fpr if fpr is None else fpr
        if not 0.0 < fpr < 1.0:
            raise LogitguardError(f"fpr must be in (0, 1), got {fpr!r}")
        clean_scores = np.sort(np.asarray(clean_scores, dtype=np.float64))
        self.calibration_scores_ = clean_scores
        self.threshold_ = threshold_at_fpr(clean_scores, fpr)
        self.achieved_fpr_ = float((clean_scores > self.threshold_).mean())
        self.fpr = fpr
        return self

    def with_fpr(self, fpr: float) -> Detector:
        """A copy recalibrated to another target FPR on the same clean calibration scores (no refit)."""
        if not hasattr(self, "calibration_scores_"):
            raise LogitguardError(f"this {type(self).__name__} is not fitted yet; call fit() or load() first")
        other = copy.copy(self)
        return other.calibrate(self.calibration_scores_, fpr)

    def predict(self, table: LogitTable) -> np.ndarray:
        """Flags (N,) bool: True where the row looks adversarial at the calibrated threshold."""
        if not hasattr(self, "threshold_"):
            raise LogitguardError(f"this {type(self).__name__} is not fitted yet; call fit() or load() first")
        return self.score(table) > self.threshold_

    # -- persistence -------------------------------------------------------------------------

    def _state(self) -> dict[str, np.ndarray]:
        """Learned arrays to save (none for the fixed baselines)."""
        return {}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of `_state`."""

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        if not hasattr(self, "threshold_"):
            raise LogitguardError(f"this {type(self).__name__} is not fitted yet; nothing to save")
        path = Path(path)
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind,
                  "params": self.get_params(), "threshold": self.threshold_, "achieved_fpr": self.achieved_fpr_}
        state = {**self._state(), "calibration_scores": self.calibration_scores_}
        return save_arrays(path, header, state, overwrite=overwrite)


def load_detector(path: str | os.PathLike) -> Detector:
    """Read any detector written by `Detector.save` (plain arrays only; nothing is unpickled)."""
    path = Path(path)
    header, arrays = load_arrays(path, FORMAT, "detector")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise LogitguardError(f"{path}: written by a newer logitguard; upgrade")
    cls = REGISTRY.get(header["kind"])
    if cls is None:
        raise LogitguardError(f"{path}: unknown detector kind {header['kind']!r}")
    detector = cls(**header["params"])
    detector.calibration_scores_ = arrays.pop("calibration_scores")
    detector._restore(arrays)
    detector.threshold_, detector.achieved_fpr_ = header["threshold"], header["achieved_fpr"]
    return detector
