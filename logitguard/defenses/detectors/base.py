"""The detector contract shared by every detector (on top of `logitguard.defenses.estimator.Estimator`).

``score_samples(logits, noisy_logits=None)`` returns one float per row where **higher means more
likely adversarial** (scores from papers that run the other way are negated; note that scikit-learn's
outlier detectors use the opposite sign). ``flag`` returns bool flags, True for rows whose score exceeds a threshold
calibrated on clean rows to the target false-positive rate ``fpr`` (default 5%); the FPR reached on
the calibration rows is kept as ``achieved_fpr_``. Detectors ``flag``; correctors ``predict`` labels.
``fit_table`` / ``score_table`` / ``flag_table`` do the same on the rows of a `LogitTable`; ``fit_path``
fits from a table on disk without loading it (`streamed_fit`).

Detectors that read a table column besides the logits name it in `input_column` (``"features"``: the
penultimate-layer activations, ``"insen"``: the input-sensitivity statistics). Their array methods take
its rows as ``features=`` (N, F) and the table wrappers read it from the table; everything else (the
threshold, the calibration, the file format) is shared. A deployable `GatedDefense` / `Guard` sees only
logits and refuses them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from sklearn.base import clone

from ...errors import LogitguardError
from ..estimator import Estimator, check_logits, choose_attacks
from ..decision import flag, successful_attack, threshold_at_fpr
from ...tables import CLEAN, LogitTable, holdout_mask, pair, require_one_split
from .streamed_fit import StreamedFit



class Detector(StreamedFit, Estimator):
    """Base class: subclasses set `kind`, implement `_scores` and, if they learn anything, `_fit`,
    `_learned` and `_restore_learned`."""

    kind: ClassVar[str]
    fitted_attribute = "threshold_"
    describes = "detector"
    needs_noise: ClassVar[bool] = False
    # Supervised detectors fit their weights on most samples and calibrate the threshold on the rest:
    # a threshold set on the rows a network was trained on undershoots the FPR on new rows.
    calibration_fraction: ClassVar[float] = 0.0
    # Supervised detectors learn "attacked" from attacks that succeeded; failed ones look clean.
    successful_attacks_only: ClassVar[bool] = False
    # A table column the score reads besides the logits ("features" or "insen"); None: logits (and noise) only.
    input_column: ClassVar[str | None] = None

    def __init__(self, *, fpr: float = 0.05) -> None:
        self.fpr = fpr

    def _check_params(self) -> None:
        if not 0.0 < self.fpr < 1.0:
            raise LogitguardError(f"fpr must be in (0, 1), got {self.fpr!r}")

    # -- arrays ------------------------------------------------------------------------------

    def fit(self, logits: np.ndarray, attacked: np.ndarray | None = None, *, labels: np.ndarray | None = None,
            noisy_logits: np.ndarray | None = None, groups: np.ndarray | None = None,
            features: np.ndarray | None = None) -> Detector:
        """Learn from logits (N, C) and calibrate the threshold on the clean rows.

        attacked : (N,) bool, True for adversarial rows (supervised detectors learn from them; pass only
            successful attacks to those with `successful_attacks_only`). None: every row is clean.
        labels : (N,) true labels, for detectors that also learn a correction (the odds test's logistic rule).
        noisy_logits : (N, K, C) noise queries, required by detectors with `needs_noise`.
        groups : (N,) sample ids: supervised detectors hold out a share ``calibration_fraction`` of the
            groups for calibration (all rows of a sample on one side). Default: one group per row.
        features : (N, F) rows of the `input_column`, required by (and only by) detectors that have one.
        """
        self._check_params()
        logits, noisy = check_logits(logits, noisy_logits, needs_noise=self.needs_noise)
        inputs = self._check_inputs(features, len(logits), fitting=True)
        n = len(logits)
        attacked = np.zeros(n, dtype=bool) if attacked is None else np.asarray(attacked, dtype=bool)
        if attacked.shape != (n,):
            raise LogitguardError(f"attacked must have shape ({n},), got {attacked.shape}")
        if attacked.all():
            raise LogitguardError("fitting a detector needs clean rows (attacked=False) to calibrate on")
        if labels is not None:
            labels = np.asarray(labels)
        groups = np.arange(n) if groups is None else np.asarray(groups)
        held = holdout_mask(groups, self.calibration_fraction, seed=0)
        if held.all() or not (held & ~attacked).any():
            held[:] = False
        self.n_classes_ = logits.shape[1]
        self.n_queries_ = 0 if noisy is None else noisy.shape[1]
        if inputs is not None:
            self.n_features_ = inputs.shape[1]
        learn = ~held
        self._fit(logits[learn], attacked[learn], None if labels is None else labels[learn],
                  None if noisy is None else noisy[learn], **self._extra(inputs, learn))
        calibrate = (held if held.any() else np.ones(n, dtype=bool)) & ~attacked
        return self.calibrate(self._scores(logits[calibrate], None if noisy is None else noisy[calibrate],
                                           **self._extra(inputs, calibrate)))

    def _extra(self, inputs: np.ndarray | None, rows: Any = slice(None)) -> dict[str, np.ndarray]:
        """The keyword `_fit` and `_scores` of a detector with an `input_column` take: ``features=`` its rows."""
        return {} if inputs is None else {"features": inputs[rows]}

    def _check_inputs(self, features: Any, n: int, *, fitting: bool = False) -> np.ndarray | None:
        """The `input_column` rows as float64 (N, F), checked; None for detectors without one."""
        column = self.input_column
        if column is None:
            if features is not None:
                raise LogitguardError(f"the {self.kind!r} detector reads logits only; it takes no features=")
            return None
        if features is None:
            raise LogitguardError(f"the {self.kind!r} detector reads the {column!r} column: pass its rows as "
                                  f"features= (an (N, F) array)")
        try:
            values = np.asarray(features, dtype=np.float64)
        except (TypeError, ValueError):
            raise LogitguardError(f"features ({column!r}) must be numbers in an (N, F) array") from None
        if values.ndim != 2 or values.shape[0] != n or values.shape[1] < 1:
            raise LogitguardError(f"features ({column!r}) must have shape (N, F) = ({n}, F), got {values.shape}")
        width = None if fitting else getattr(self, "n_features_", None)
        if width is not None and values.shape[1] != width:
            raise LogitguardError(f"features ({column!r}) have {values.shape[1]} values per row; this detector was "
                                  f"fitted on {width}")
        if not np.isfinite(values).all():
            row = int(np.argwhere(~np.isfinite(values))[0][0])
            raise LogitguardError(f"features ({column!r}) contain NaN or infinite values (first in row {row})")
        return values

    def _fit(self, logits: np.ndarray, attacked: np.ndarray, labels: np.ndarray | None,
             noisy: np.ndarray | None) -> None:
        """Learn what the score needs (nothing for the fixed baselines)."""

    def score_samples(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None, *,
                      features: np.ndarray | None = None) -> np.ndarray:
        """Scores (N,) float64, higher = more likely adversarial (`features`: (N, F) `input_column` rows)."""
        self._check_fitted()
        logits, noisy = check_logits(logits, noisy_logits, num_classes=getattr(self, "n_classes_", None),
                                     num_queries=getattr(self, "n_queries_", None), needs_noise=self.needs_noise)
        return self._scores(logits, noisy, **self._extra(self._check_inputs(features, len(logits))))

    def _scores(self, logits: np.ndarray, noisy: np.ndarray | None) -> np.ndarray:
        """`score_samples` on validated float64 arrays."""
        raise NotImplementedError

    def flag(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None, *,
             features: np.ndarray | None = None) -> np.ndarray:
        """Flags (N,) bool: True where the row looks adversarial at the calibrated threshold (`decision.flag`:
        a NaN score is flagged)."""
        return flag(self.score_samples(logits, noisy_logits, features=features), self.threshold_)

    def calibrate(self, clean_scores: np.ndarray) -> Detector:
        """Set `threshold_` so that at most ``fpr`` of `clean_scores` exceed it."""
        self._check_params()
        clean_scores = np.sort(np.asarray(clean_scores, dtype=np.float64))
        if not len(clean_scores):
            raise LogitguardError("no clean rows to calibrate the threshold on")
        self.calibration_scores_ = clean_scores
        self.threshold_ = threshold_at_fpr(clean_scores, self.fpr)
        self.achieved_fpr_ = float(flag(clean_scores, self.threshold_).mean())
        return self

    def with_fpr(self, fpr: float) -> Detector:
        """A copy recalibrated to another target FPR on the same clean calibration scores (no refit)."""
        self._check_fitted()
        other = clone(self).set_params(fpr=fpr)
        state, arrays = self._state()
        other._restore(state, arrays)
        return other.calibrate(self.calibration_scores_)

    # -- tables ------------------------------------------------------------------------------

    def fit_table(self, table: LogitTable, attacks: str | Sequence[str] | None = None) -> Detector:
        """`fit` on the rows of `table`, of one split (select them first: ``table.select(split="train")``):
        clean rows and, for supervised detectors, attacked rows of `attacks` (default all; only successful
        ones where `successful_attacks_only`), grouped by sample id."""
        require_one_split(table, f"fitting a {self.kind} detector", hint="train")
        chosen = self._attacks_to_fit(table.attacks, attacks, has_noise=table.noisy_logits is not None)
        self._table_inputs(table)  # a missing input column is refused before any work
        parts = [table.select(attacks=CLEAN)]
        for attack in chosen:
            if self.successful_attacks_only:
                clean, rows = pair(table, attack)
                parts.append(rows.take(successful_attack(clean.logits.argmax(1), rows.logits.argmax(1), clean.labels)))
            else:
                parts.append(table.select(attacks=attack))
        logits = np.concatenate([p.logits for p in parts])
        noisy = None if table.noisy_logits is None else np.concatenate([p.noisy_logits for p in parts])
        attacked = np.repeat([False] + [True] * len(chosen), [len(p) for p in parts])
        labels = np.concatenate([p.labels for p in parts]) if table.has_labels else None
        groups = np.concatenate([p.sample_id for p in parts])
        inputs = None if self.input_column is None else np.concatenate([self._table_inputs(p) for p in parts])
        return self.fit(logits, attacked, labels=labels, noisy_logits=noisy, groups=groups, features=inputs,
                        **self._table_fit_options(table))

    def _table_fit_options(self, table: LogitTable) -> dict[str, Any]:
        """Extra keywords `fit_table` passes to `fit`, read from the table (the odds test: its noise kinds)."""
        return {}

    def _attacks_to_fit(self, available: list[str], attacks: list[str] | None, *, has_noise: bool) -> list[str]:
        """The attacked partitions `fit_table` / `fit_path` learn from (default: all of `available`), after
        checking that the table has the noise queries, clean rows and attacks the fit needs."""
        if self.needs_noise and not has_noise:
            raise LogitguardError(f"the {self.kind!r} detector needs noise queries (column 'noisy_logits')")
        if CLEAN not in available:
            raise LogitguardError(f"fitting a detector needs clean rows; the table has {available}")
        return choose_attacks(attacks, available, required=False)

    def score_table(self, table: LogitTable) -> np.ndarray:
        """`score_samples` of every row of `table`."""
        return self.score_samples(table.logits, self._table_noise(table), features=self._table_inputs(table))

    def flag_table(self, table: LogitTable) -> np.ndarray:
        """`flag` for every row of `table`."""
        return self.flag(table.logits, self._table_noise(table), features=self._table_inputs(table))

    def _table_inputs(self, table: LogitTable) -> np.ndarray | None:
        """The `input_column` of `table` (N, F), or None for detectors without one."""
        if self.input_column is None:
            return None
        values = getattr(table, self.input_column)
        if values is None:
            raise LogitguardError(self._missing_column())
        return values

    def _missing_column(self) -> str:
        flag = {"features": "--features", "insen": "--insen"}.get(self.input_column, "")
        return (f"the {self.kind!r} detector reads the table column {self.input_column!r}, which this table lacks "
                f"(the producer writes it with `export {flag}`)")

    def _table_noise(self, table: LogitTable) -> np.ndarray | None:
        if self.needs_noise and table.noisy_logits is None:
            raise LogitguardError(f"the {self.kind!r} detector needs noise queries (column 'noisy_logits')")
        return table.noisy_logits if self.needs_noise else None

    # -- persistence -------------------------------------------------------------------------

    def _learned(self) -> dict[str, np.ndarray]:
        """Learned arrays (none for the fixed baselines)."""
        return {}

    def _restore_learned(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of `_learned`."""

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        state = {"threshold": float(self.threshold_), "achieved_fpr": self.achieved_fpr_,
                 "n_classes": getattr(self, "n_classes_", None), "n_queries": getattr(self, "n_queries_", None)}
        if getattr(self, "n_features_", None) is not None:
            state["n_features"] = int(self.n_features_)
        return state, {**self._learned(), "calibration_scores": self.calibration_scores_}

    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.calibration_scores_ = arrays.pop("calibration_scores")
        self._restore_learned(arrays)
        if state.get("n_classes") is not None:
            self.n_classes_ = int(state["n_classes"])
        if state.get("n_queries") is not None:
            self.n_queries_ = int(state["n_queries"])
        if state.get("n_features") is not None:
            self.n_features_ = int(state["n_features"])
        self.threshold_, self.achieved_fpr_ = float(state["threshold"]), float(state["achieved_fpr"])


def load_detector(path: str | os.PathLike) -> Detector:
    """Read any detector file (plain arrays only; nothing is unpickled)."""
    return Detector.load(path)


