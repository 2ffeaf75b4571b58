"""`OddsTest` and `SingleShotOddsTest`: fit, score, correct and persist (see the package docstring).

The score and the correction run `logitguard.defenses.math.odds` on the test's arrays (`odds_arrays`), row
batch by row batch; the producer's mirror runs the same functions on the same arrays as torch tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np

from ....errors import LogitguardError
from ....tables import LogitTable
from ...decision import flag
from ...estimator import check_logits
from ...math.odds import OddsArrays, group_means, log_odds_changes, odds_class_scores, odds_features, odds_score
from ..base import Detector
from .fitting import Moments, class_quantiles, fit_correction, row_batches
from .kinds import check_kinds, group_weights, kind_ids, noise_kinds_from_metadata

MAX_LOGISTIC_CLASSES = 100
AGGREGATIONS = ("query", "per-kind", "mean")
CORRECTIONS = ("argmax", "logistic", "reference")


class OddsTest(Detector):
    """The noisy odds test; see the module docstring.

    Parameters
    ----------
    fpr : target false-positive rate on clean rows.
    thresholds : "global" (one cutoff for every pair, as the reference) or "pair" (per (y, z) clean quantiles
        subtracted first).
    aggregation : how the K queries are z-scored: "query" (each query, then the mean), "per-kind" (the
        reference: the draw average of each noise kind, then the mean over kinds) or "mean" (the K-average).
    correction : "argmax", "logistic" or "reference" (Roth et al.'s classifier), the rule `correct` applies.
    min_rows : classes with fewer clean rows borrow pooled statistics; with ``logistic``, classes with
        fewer attacked rows use the argmax rule.

    "per-kind" and "reference" need the noise kind of each query: `fit_table` / `fit_path` read it from the
    table metadata (``noise``), `fit` takes ``noise_kinds=`` (K,) labels (equal labels: one kind).
    """

    kind = "odds"
    needs_noise = True
    noise = True

    def __init__(self, *, fpr: float = 0.05, thresholds: str = "global", aggregation: str = "query",
                 correction: str = "argmax", min_rows: int = 10) -> None:
        super().__init__(fpr=fpr)
        self.thresholds = thresholds
        self.aggregation = aggregation
        self.correction = correction
        self.min_rows = min_rows

    def _check_params(self) -> None:
        super()._check_params()
        if self.thresholds not in ("pair", "global"):
            raise LogitguardError(f"thresholds must be 'pair' or 'global', got {self.thresholds!r}")
        if self.aggregation not in AGGREGATIONS:
            raise LogitguardError(f"aggregation must be one of {list(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.correction not in CORRECTIONS:
            raise LogitguardError(f"correction must be one of {list(CORRECTIONS)}, got {self.correction!r}")
        if isinstance(self.min_rows, bool) or not isinstance(self.min_rows, (int, np.integer)) or self.min_rows < 1:
            raise LogitguardError(f"min_rows must be an integer >= 1, got {self.min_rows!r}")

    @property
    def successful_attacks_only(self) -> bool:  # type: ignore[override]
        """The reference classifier learns from successful attacks only (`fit_table` passes only those)."""
        return self.correction == "reference"

    @property
    def _needs_kinds(self) -> bool:
        return self.noise and (self.aggregation == "per-kind" or self.correction == "reference")

    # -- noise kinds -------------------------------------------------------------------------

    def fit(self, logits: np.ndarray, attacked: np.ndarray | None = None, *, labels: np.ndarray | None = None,
            noisy_logits: np.ndarray | None = None, groups: np.ndarray | None = None,
            features: np.ndarray | None = None, noise_kinds: np.ndarray | None = None) -> OddsTest:
        """`Detector.fit`; noise_kinds : (K,) the noise kind of each query (needed by "per-kind" / "reference").

        The query groups are set from the kinds before the shared fit runs (`_fit` reads them)."""
        self._check_params()
        shape = np.shape(noisy_logits) if self.noise and noisy_logits is not None else ()
        self._adopt_kinds(noise_kinds, shape[1] if len(shape) == 3 else 1)
        return super().fit(logits, attacked, labels=labels, noisy_logits=noisy_logits, groups=groups,
                           features=features)

    def _table_fit_options(self, table: LogitTable) -> dict[str, Any]:
        kinds = noise_kinds_from_metadata(table.metadata) if self.noise else None
        return {} if kinds is None else {"noise_kinds": kinds}

    def _adopt_kinds(self, noise_kinds: Any, queries: int) -> None:
        """Set `noise_kinds_` (K,) str (None when unknown) and `query_group_` (K,), the z-scored group of each query."""
        kinds = check_kinds(noise_kinds, queries) if self.noise else None
        if kinds is None and self._needs_kinds:
            what = "aggregation='per-kind'" if self.aggregation == "per-kind" else "correction='reference'"
            raise LogitguardError(f"{what} groups the noise queries by kind: fit on a table whose metadata records "
                                  f"the noise recipe ('noise'), or pass noise_kinds= (one label per query, e.g. "
                                  f"'gaussian:0.05')")
        self.noise_kinds_ = kinds
        if not self.noise or self.aggregation == "mean":
            self.query_group_ = np.zeros(queries if self.noise else 1, dtype=np.int64)
        elif self.aggregation == "query":
            self.query_group_ = np.arange(queries, dtype=np.int64)
        else:
            self.query_group_ = kind_ids(kinds)

    def _check_query_kinds(self, noise_kinds: Any) -> None:
        """Refuse queries whose kinds differ from those the detector was fitted on."""
        fitted = getattr(self, "noise_kinds_", None)
        if noise_kinds is None or fitted is None or not self.noise:
            return
        kinds = check_kinds(noise_kinds, len(fitted))
        if not np.array_equal(kinds, fitted):
            raise LogitguardError(f"the noise queries are of kinds {kinds.tolist()}; this detector was fitted on "
                                  f"{fitted.tolist()}")

    def _check_table_kinds(self, table: LogitTable) -> None:
        if self.noise:
            self._check_query_kinds(noise_kinds_from_metadata(table.metadata))

    # -- the arrays the math reads -------------------------------------------------------------

    def odds_arrays(self) -> OddsArrays:
        """The fitted arrays `logitguard.defenses.math.odds` reads (NumPy); the mirror converts them to torch.
        The pair thresholds and correction models are None while `fit` has not set them yet."""
        self._check_moments()
        logistic = self.correction != "argmax" and hasattr(self, "logistic_fitted_")
        return OddsArrays(self.mean_, self._inverse_scale, getattr(self, "pair_threshold_", None),
                          group_weights(self.query_group_), self._kind_weights,
                          self.logistic_weights_ if logistic else None, self.logistic_bias_ if logistic else None,
                          self.logistic_fitted_ if logistic else None)

    @cached_property
    def _inverse_scale(self) -> np.ndarray:
        """1 / (G σ), (C, G, C): multiplying by it and summing over the G groups averages their z-scores."""
        return 1.0 / (self.std_ * self.std_.shape[1])

    @property
    def _kind_weights(self) -> np.ndarray | None:
        """(E, K) averaging weights of the noise kinds (the reference classifier's inputs), or None."""
        if self.correction != "reference":
            return None
        group = kind_ids(self.noise_kinds_) if self.noise else np.zeros(1, dtype=np.int64)
        weights = group_weights(group)
        return np.eye(len(group)) if weights is None else weights

    def _forget_derived(self) -> None:
        self.__dict__.pop("_inverse_scale", None)  # derived from std_

    # -- features ------------------------------------------------------------------------------

    def grouped_changes(self, logits: np.ndarray, noisy: np.ndarray | None,
                        group: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes y (N,) and the log-odds changes averaged within each query group (N, G, C).

        `group` (K,) gives each query's group (default `query_group_`, the z-scored groups)."""
        group = self.query_group_ if group is None else group
        y, g = log_odds_changes(logits, noisy if self.noise else None)
        if g.shape[1] != len(group):
            raise LogitguardError(f"the input has {g.shape[1]} noise queries; this detector was fitted on {len(group)}")
        return y, group_means(g, group_weights(group))

    def kind_features(self, logits: np.ndarray, noisy: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes y (N,) and the reference classifier's raw features (N, E*C): the draw average of
        the log-odds changes for each of the E noise kinds (column y of each kind is 0)."""
        group = kind_ids(self.noise_kinds_) if self.noise else np.zeros(1, dtype=np.int64)
        y, a = self.grouped_changes(logits, noisy, group)
        return y, a.reshape(len(a), -1)

    def _batches(self, logits: np.ndarray, noisy: np.ndarray | None,
                 arrays: OddsArrays) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """(rows, y (B,), g (B, K, C)) over row batches whose temporaries hold about 2^20 elements."""
        c = arrays.mean.shape[2]
        if logits.shape[1] != c:
            raise LogitguardError(f"the input has {logits.shape[1]} classes; this detector was fitted on {c}")
        queries = len(self.query_group_)
        width = c * queries
        if arrays.logistic_weights is not None:  # the correction gathers a (C, F) model per row
            width = max(width, c * arrays.logistic_weights.shape[2])
        for rows in row_batches(len(logits), width):
            y, g = log_odds_changes(logits[rows], None if noisy is None or not self.noise else noisy[rows])
            if g.shape[1] != queries:
                raise LogitguardError(f"the input has {g.shape[1]} noise queries; this detector was fitted on {queries}")
            yield rows, y, g

    def features(self, logits: np.ndarray, noisy: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes y (N,) and z-scored features (N, C), averaged over query groups; -inf at z = y.

        Takes validated float64 arrays (`score_samples` and `correct` validate theirs)."""
        arrays = self.odds_arrays()
        y, z = np.empty(len(logits), dtype=np.int64), np.empty(logits.shape)
        for rows, yb, g in self._batches(logits, noisy, arrays):
            y[rows], z[rows] = yb, odds_features(yb, g, arrays)
        return y, z

    # -- fit, score, correct -----------------------------------------------------------------

    def _fit(self, logits: np.ndarray, attacked: np.ndarray, labels: np.ndarray | None,
             noisy: np.ndarray | None) -> None:
        noisy = noisy if self.noise else None
        if not hasattr(self, "query_group_"):  # `fit` sets the groups; a direct `_fit` call gets the defaults
            self._adopt_kinds(None, 1 if noisy is None else noisy.shape[1])
        clean_logits, clean_noisy = logits[~attacked], None if noisy is None else noisy[~attacked]
        moments = Moments(logits.shape[1], int(self.query_group_.max()) + 1)
        moments.add(self, clean_logits, clean_noisy)
        self.mean_, self.std_ = moments.result(self.min_rows)
        self._forget_derived()
        c = logits.shape[1]
        self.pair_threshold_ = np.zeros((c, c))
        if self.thresholds == "pair":
            y, z = self.features(clean_logits, clean_noisy)
            self.pair_threshold_ = class_quantiles(y, z, 1.0 - self.fpr, self.min_rows)
        if self.correction != "argmax":
            self._check_correction_data(c, labels, attacked)
            hit_logits, hit_noisy = logits[attacked], None if noisy is None else noisy[attacked]
            rule = self.kind_features if self.correction == "reference" else self.features
            self._fit_correction(*rule(hit_logits, hit_noisy), labels[attacked], c)

    def _check_correction_data(self, c: int, labels: np.ndarray | None, attacked: np.ndarray) -> None:
        if c > MAX_LOGISTIC_CLASSES:
            raise LogitguardError(f"correction={self.correction!r} stores a {c} x {c} matrix per class; use 'argmax' "
                                  f"above {MAX_LOGISTIC_CLASSES} classes")
        if labels is None or not attacked.any():
            raise LogitguardError(f"correction={self.correction!r} learns from attacked rows and their true labels; "
                                  f"pass attacked= and labels=")

    def _fit_stream(self, stream, rows: np.ndarray, attacked: np.ndarray, labels: np.ndarray | None,
                    max_rows: int | None) -> None:
        """`_fit` from streamed batches (`Detector.fit_path`): the class moments are sums over every clean row;
        per-pair thresholds and the correction classifiers learn from the features of the rows (or a sample)."""
        from ..streamed_fit import as_float64

        c = stream.keys.num_classes
        self._adopt_kinds(noise_kinds_from_metadata(stream.keys.metadata) if self.noise else None,
                          self.n_queries_ if self.noise else 1)
        if self.correction != "argmax":
            self._check_correction_data(c, labels, attacked)
        moments = Moments(c, int(self.query_group_.max()) + 1)
        stream.each(rows[~attacked], lambda _, z, q: moments.add(self, *as_float64(z, q)), noise=self.noise)
        self.mean_, self.std_ = moments.result(self.min_rows)
        self._forget_derived()

        def features(z: np.ndarray, q: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            return self.features(*as_float64(z, q))

        def kind_features(z: np.ndarray, q: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            return self.kind_features(*as_float64(z, q))

        self.pair_threshold_ = np.zeros((c, c))
        if self.thresholds == "pair":
            clean = rows[~attacked]
            take = self._stream_sample(len(clean), max_rows, 8 * c)
            y, z = stream.collect(clean[take], features, noise=self.noise)
            self.pair_threshold_ = class_quantiles(y, z, 1.0 - self.fpr, self.min_rows)
        if self.correction != "argmax":
            hit = np.flatnonzero(attacked)
            take = self._stream_sample(len(hit), max_rows, 8 * c * len(self.query_group_))
            rule = kind_features if self.correction == "reference" else features
            y, x = stream.collect(rows[hit[take]], rule, noise=self.noise)
            self._fit_correction(y, x, labels[hit[take]], c)

    def _scores(self, logits: np.ndarray, noisy: np.ndarray | None) -> np.ndarray:
        arrays = self.odds_arrays()
        out = np.empty(len(logits))
        for rows, y, g in self._batches(logits, noisy, arrays):
            out[rows] = odds_score(y, odds_features(y, g, arrays), arrays)
        return out

    def score_samples(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None, *,
                      features: np.ndarray | None = None, noise_kinds: np.ndarray | None = None) -> np.ndarray:
        """`Detector.score_samples`; `noise_kinds` (K,), when given, must be the kinds the detector was fitted on."""
        self._check_fitted()
        self._check_query_kinds(noise_kinds)
        return super().score_samples(logits, noisy_logits, features=features)

    def flag(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None, *,
             features: np.ndarray | None = None, noise_kinds: np.ndarray | None = None) -> np.ndarray:
        """Flags (N,) bool at the calibrated threshold (see `score_samples`)."""
        return flag(self.score_samples(logits, noisy_logits, features=features, noise_kinds=noise_kinds),
                    self.threshold_)

    def score_table(self, table: LogitTable) -> np.ndarray:
        self._check_fitted()
        self._check_table_kinds(table)
        return super().score_table(table)

    def flag_table(self, table: LogitTable) -> np.ndarray:
        self._check_fitted()
        self._check_table_kinds(table)
        return super().flag_table(table)

    def correct(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None, *,
                noise_kinds: np.ndarray | None = None) -> np.ndarray:
        """Corrected labels (N,) for every row by the `correction` rule (apply to flagged rows; see `GatedDefense`).

        No rule returns a row's predicted class: argmax skips it, and the classifiers never learned it
        (``reference``) or fall back to argmax."""
        self._check_fitted()
        self._check_query_kinds(noise_kinds)
        logits, noisy = check_logits(logits, noisy_logits, num_classes=getattr(self, "n_classes_", None),
                                     num_queries=getattr(self, "n_queries_", None), needs_noise=self.needs_noise)
        arrays = self.odds_arrays()
        labels = np.empty(len(logits), dtype=np.int64)
        for rows, y, g in self._batches(logits, noisy, arrays):
            scores = odds_class_scores(y, g, odds_features(y, g, arrays), arrays, self.correction)
            labels[rows] = scores.argmax(axis=1)
        return labels

    def correct_table(self, table: LogitTable) -> np.ndarray:
        """`correct` for every row of `table`."""
        self._check_fitted()
        self._check_table_kinds(table)
        return self.correct(table.logits, self._table_noise(table))

    def _fit_correction(self, y: np.ndarray, x: np.ndarray, labels: np.ndarray, c: int) -> None:
        """The correction classifiers (`fitting.fit_correction`) from classes y (N,), features x (N, F), labels (N,)."""
        self.logistic_weights_, self.logistic_bias_, self.logistic_fitted_ = fit_correction(
            y, x, labels, c, self.correction, self.min_rows)

    # -- persistence -------------------------------------------------------------------------

    def _learned(self) -> dict[str, np.ndarray]:
        state = {"mean": self.mean_, "std": self.std_, "pair_threshold": self.pair_threshold_,
                 "query_group": self.query_group_}
        if getattr(self, "noise_kinds_", None) is not None:
            state["noise_kinds"] = self.noise_kinds_
        if self.correction != "argmax":
            state |= {"logistic_weights": self.logistic_weights_, "logistic_bias": self.logistic_bias_,
                      "logistic_fitted": self.logistic_fitted_}
        return state

    def _restore_learned(self, arrays: dict[str, np.ndarray]) -> None:
        names = ["mean", "std", "pair_threshold"]
        if self.correction != "argmax":
            names += ["logistic_weights", "logistic_bias", "logistic_fitted"]
        for name in names:
            setattr(self, f"{name}_", arrays[name])
        # Files written before `aggregation` existed z-scored every query on its own.
        group = arrays.get("query_group")
        self.query_group_ = np.arange(self.mean_.shape[1]) if group is None else group.astype(np.int64)
        kinds = arrays.get("noise_kinds")
        self.noise_kinds_ = None if kinds is None else kinds.astype(str)
        self._forget_derived()

    def _check_moments(self) -> None:
        """The class moments exist: set by `fit` before the threshold is (`features` runs mid-fit)."""
        self._check_fitted("mean_")


class SingleShotOddsTest(OddsTest):
    """The odds test without noise queries: z-scored log-odds of the row itself (weaker; see module)."""

    kind = "odds-single"
    needs_noise = False
    noise = False
