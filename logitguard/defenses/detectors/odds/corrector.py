"""The odds test as a corrector: its correction rule behind the corrector protocol."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from ....errors import LogitguardError
from ....tables import LogitTable
from .detector import OddsTest


class OddsCorrector(BaseEstimator):
    """A fitted odds test used as a corrector: ``predict`` is its correction rule (`OddsTest.correct`).

    `GatedDefense` and manifests accept an odds detector file as a corrector; this adapter gives it the
    corrector protocol (``predict(logits, noisy_logits)`` → labels) without overloading the detector's
    own ``flag``. A scikit-learn meta-estimator: `odds` is its one parameter (stored as given; `clone`
    clones it, unfitted), `fit` fits it, and it is fitted exactly when `odds` is.
    """

    def __init__(self, odds: OddsTest | None = None) -> None:
        self.odds = odds

    @property
    def needs_noise(self) -> bool:
        return bool(self._odds().needs_noise)

    def _odds(self) -> OddsTest:
        if not isinstance(self.odds, OddsTest):
            raise LogitguardError(f"OddsCorrector wraps an odds test (OddsTest), got {type(self.odds).__name__}")
        return self.odds

    def __sklearn_is_fitted__(self) -> bool:
        return isinstance(self.odds, OddsTest) and self.odds.__sklearn_is_fitted__()

    def fit(self, *args: Any, **kwargs: Any) -> OddsCorrector:
        """`OddsTest.fit` on the wrapped odds test (same arguments); returns self."""
        self._odds().fit(*args, **kwargs)
        return self

    def predict(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> np.ndarray:
        """Corrected labels (N,) by the odds test's correction rule."""
        return self._odds().correct(logits, noisy_logits)

    def predict_table(self, table: LogitTable) -> np.ndarray:
        return self._odds().correct_table(table)
