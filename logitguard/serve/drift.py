"""Drift watch: is the flagged rate of recent traffic what clean traffic would give?

A detector's threshold is calibrated so that a share ``fpr`` of clean rows is flagged; the share it
reached on its clean calibration rows is ``achieved_fpr_``. `DriftWatch` keeps the flags and scores of
the last W checked rows in a ring buffer and compares them with that calibration:

- a two-sided exact binomial test (`scipy.stats.binomtest`) of the window's flag count against the
  calibrated rate;
- a two-sample Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`) of the window's scores against the
  clean calibration scores. It is reported, not alerted on: it reacts to any shift of the score
  distribution, also below the threshold where nothing is flagged.

Pure NumPy/SciPy; no server needed. Updates are vectorised and thread-safe; the tests run when
`status` is asked for (``/v1/info``, ``/metrics``), not per request.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from scipy.stats import binomtest, ks_2samp

from . import DEFAULT_DRIFT_ALPHA, DEFAULT_DRIFT_MIN_ROWS, DEFAULT_DRIFT_WINDOW

__all__ = ["DriftWatch"]


class DriftWatch:
    """Rolling flagged rate of the last `window` rows, tested against a detector's calibrated FPR.

    ``alert`` is true when the window holds at least `min_rows` rows and the binomial p-value is below
    `alpha`: the flagged rate departs from what clean traffic would give by more than chance explains.
    Above the calibrated rate that means an attack campaign (or clean traffic unlike the calibration
    rows); below it, a change of the model or its inputs that silenced the detector. It is a verdict on
    the stream, never on a row. On clean traffic that matches the calibration rows, one status check
    alerts with probability about `alpha`.

    Parameters
    ----------
    expected_rate : the flag rate of clean traffic (a detector's ``achieved_fpr_``), or None when there
        is no detector (then nothing is tested: `status` says "not applicable").
    calibration_scores : the detector's clean calibration scores (M,), for the KS test.
    window : W, the rows kept.  alpha : the alert level.  min_rows : rows needed before any alert.
    """

    def __init__(self, expected_rate: float | None, calibration_scores: np.ndarray | None = None, *,
                 window: int = DEFAULT_DRIFT_WINDOW, alpha: float = DEFAULT_DRIFT_ALPHA,
                 min_rows: int = DEFAULT_DRIFT_MIN_ROWS) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.window, self.alpha, self.min_rows = int(window), float(alpha), int(min_rows)
        self.calibration_scores = None if calibration_scores is None else np.sort(np.asarray(calibration_scores, float))
        self.expected_rate = None if expected_rate is None else _usable_rate(expected_rate, self.calibration_scores)
        self._flags = np.zeros(self.window, dtype=bool)
        self._scores = np.zeros(self.window, dtype=np.float64)
        self._next = 0  # ring position of the next write
        self._filled = 0  # rows held (<= window)
        self._seen = 0  # rows ever given to update
        self._lock = threading.Lock()

    @classmethod
    def for_detector(cls, detector: Any | None, **params: Any) -> DriftWatch:
        """A watch on `detector`'s calibration (``achieved_fpr_``, ``calibration_scores_``); None: not applicable."""
        if detector is None:
            return cls(None, **params)
        return cls(detector.achieved_fpr_, detector.calibration_scores_, **params)

    @property
    def applicable(self) -> bool:
        return self.expected_rate is not None

    def update(self, flagged: np.ndarray, scores: np.ndarray) -> None:
        """Add the flags (N,) bool and detector scores (N,) of N checked rows (oldest rows drop out)."""
        if not self.applicable:
            return
        flagged, scores = np.asarray(flagged, dtype=bool), np.asarray(scores, dtype=np.float64)
        if flagged.shape != scores.shape or flagged.ndim != 1:
            raise ValueError(f"flagged and scores must both have shape (N,), got {flagged.shape} and {scores.shape}")
        n = len(flagged)
        kept = min(n, self.window)
        with self._lock:
            slots = (self._next + np.arange(kept)) % self.window
            self._flags[slots] = flagged[n - kept:]
            self._scores[slots] = scores[n - kept:]
            self._next = (self._next + kept) % self.window
            self._filled = min(self.window, self._filled + kept)
            self._seen += n

    def status(self) -> dict[str, Any]:
        """JSON-ready state: the window's flagged rate, the expected rate, both tests and ``alert``.

        Keys: ``applicable``, ``window``, ``rows`` (held), ``rows_seen``, ``flagged``, ``flagged_rate``,
        ``expected_rate``, ``binomial_pvalue``, ``ks_statistic``, ``ks_pvalue``, ``alpha``, ``min_rows``,
        ``alert``; figures are None while the window is empty. Without a detector: ``applicable`` false
        and a ``reason``.
        """
        if not self.applicable:
            return {"applicable": False, "alert": False,
                    "reason": "not applicable: the guard has no detector, so no flag rate was calibrated"}
        with self._lock:
            flags, scores, seen = self._flags[:self._filled].copy(), self._scores[:self._filled].copy(), self._seen
        rows, flagged = len(flags), int(flags.sum())
        binomial = ks = None
        if rows:
            binomial = float(binomtest(flagged, rows, self.expected_rate).pvalue)
            ks = ks_2samp(scores, self.calibration_scores) if self.calibration_scores is not None else None
        return {
            "applicable": True, "window": self.window, "rows": rows, "rows_seen": seen, "flagged": flagged,
            "flagged_rate": flagged / rows if rows else None, "expected_rate": self.expected_rate,
            "binomial_pvalue": binomial,
            "ks_statistic": None if ks is None else float(ks.statistic),
            "ks_pvalue": None if ks is None else float(ks.pvalue),
            "alpha": self.alpha, "min_rows": self.min_rows,
            "alert": bool(rows >= self.min_rows and binomial is not None and binomial < self.alpha),
        }


def _usable_rate(rate: float, calibration_scores: np.ndarray | None) -> float:
    """`rate` kept inside [1/(M+1), M/(M+1)] for M calibration rows: zero flags among M clean rows bound
    the rate by about 1/M, not 0 (at 0, a single flagged row would give p = 0 and an alert)."""
    m = len(calibration_scores) if calibration_scores is not None and len(calibration_scores) else 1_000_000
    return float(np.clip(rate, 1.0 / (m + 1), m / (m + 1)))
