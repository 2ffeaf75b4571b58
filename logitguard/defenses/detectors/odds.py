"""The odds test (Roth et al. 2019, "The odds are odd"; seed 003 §9.3), from logits alone.

For a row with predicted class y and every other class z, the pairwise log-odds is
f_z − f_y. Adding noise to an adversarial input tends to move it back towards its true class, so the
log-odds of that class rises more than it does for clean inputs. With noise queries x + η_k:

    g_k[y, z] = (f_z − f_y)(x + η_k) − (f_z − f_y)(x)            shape (N, K, C) per row batch

``aggregation`` says how the K queries are z-scored against clean training rows predicted as y, per
(y, group, z), before the group z-scores are averaged into one (N, C) feature whose maximum over z ≠ y is
the score:

- ``"query"`` (default): every query is its own group.
- ``"per-kind"``: Roth et al.'s code. The draws of one noise kind (one recipe item, e.g. ``gaussian:0.05``,
  from the table's ``noise`` metadata or ``noise_kinds=``) are averaged, each kind's average is z-scored,
  and the kinds are averaged.
- ``"mean"``: the K-average is z-scored once.

On the embedded data (`python bench/odds.py --variants`), PGD AUROC was 0.941 (query), 0.939 (per-kind)
and 0.918 (mean).

``thresholds="global"`` (default) uses the raw maximum with one cutoff for every pair, as the reference
code does (it compares the kind-averaged z-score with one normal quantile). ``"pair"`` first subtracts a
per-(y, z) threshold, the clean (1 − fpr) quantile. It is not from the reference, and on the embedded data
it scored 0.01 AUROC lower on PGD. Either way, one global threshold is then calibrated to the target FPR.

The single-shot variant (``noise=False``, kind ``odds-single``) needs no queries: it z-scores the log-odds
f_z − f_y of the row itself against clean class-conditional statistics. It only sees how unusual the
logits are for their predicted class, not how they react to noise, and is weaker. In Roth et al. the
noise reaction is the signal.

Correction of flagged rows: ``argmax`` picks the class z whose feature is largest, the class the noise
pulls towards. ``logistic`` fits, per predicted class y, a multinomial logistic regression from the
features to the true label on attacked training rows predicted y. It falls back to ``argmax`` for classes
with too few rows. ``reference`` is Roth et al.'s classifier. Per predicted class y, a multinomial logistic
regression maps the raw (not z-scored) draw average of each noise kind, E × C features, to the true label.
It learns from successful attacks only (true label ≠ y), so it never answers y. A class seen with one label
answers that label, and a class with no rows uses ``argmax``. ``logistic`` and ``reference`` store a C × C
(× E) matrix per class and are refused above 100 classes.

Statistics are sums grouped by class in one pass (sorted rows, `np.add.reduceat`): no loop over samples
or class pairs, and no torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from ...errors import LogitguardError
from ..estimator import check_logits
from ...tables import LogitTable
from .base import Detector

_MIN_STD = 1e-6
MAX_LOGISTIC_CLASSES = 100
AGGREGATIONS = ("query", "per-kind", "mean")
CORRECTIONS = ("argmax", "logistic", "reference")


def noise_kinds_from_metadata(metadata: dict[str, Any]) -> np.ndarray | None:
    """The noise kind of each query, (K,) str such as ``"gaussian:0.05"``, from a table's ``noise`` metadata
    (the producer's recipe, one item per query); None when the table records none."""
    noise = metadata.get("noise")
    if not noise:
        return None
    try:
        return np.array([f"{item['kind']}:{float(item['scale']):g}" for item in noise["recipe"]])
    except (KeyError, TypeError, ValueError):
        raise LogitguardError(f"the table's noise metadata is not a recipe: {noise!r}") from None


def _check_kinds(noise_kinds: Any, queries: int) -> np.ndarray | None:
    """`noise_kinds` as (K,) str, checked against the number of queries; None stays None."""
    if noise_kinds is None:
        return None
    kinds = np.asarray(noise_kinds)
    if kinds.ndim != 1 or len(kinds) != queries:
        raise LogitguardError(f"noise_kinds must give the kind of each of the {queries} noise queries, "
                              f"got shape {kinds.shape}")
    return kinds.astype(str)


def _kind_ids(kinds: np.ndarray) -> np.ndarray:
    """Group id per query (K,): queries with equal kind labels share one (ids follow sorted labels)."""
    return np.unique(kinds, return_inverse=True)[1].astype(np.int64).reshape(-1)


def _group_means(g: np.ndarray, group: np.ndarray) -> np.ndarray:
    """(N, K, C) → (N, G, C): the mean over the queries of each group (a view when every query is its own)."""
    if np.array_equal(group, np.arange(g.shape[1])):
        return g
    weights = np.zeros((int(group.max()) + 1, len(group)))
    weights[group, np.arange(len(group))] = 1.0
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("gk,nkc->ngc", weights, g)


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
        """`Detector.fit`; noise_kinds : (K,) the noise kind of each query (needed by "per-kind" / "reference")."""
        self._pending_kinds = noise_kinds
        try:
            return super().fit(logits, attacked, labels=labels, noisy_logits=noisy_logits, groups=groups,
                               features=features)
        finally:
            self.__dict__.pop("_pending_kinds", None)

    def _table_fit_options(self, table: LogitTable) -> dict[str, Any]:
        kinds = noise_kinds_from_metadata(table.metadata) if self.noise else None
        return {} if kinds is None else {"noise_kinds": kinds}

    def _adopt_kinds(self, noise_kinds: Any, queries: int) -> None:
        """Set `noise_kinds_` (K,) str (None when unknown) and `query_group_` (K,), the z-scored group of each query."""
        kinds = _check_kinds(noise_kinds, queries) if self.noise else None
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
            self.query_group_ = _kind_ids(kinds)

    def _check_query_kinds(self, noise_kinds: Any) -> None:
        """Refuse queries whose kinds differ from those the detector was fitted on."""
        fitted = getattr(self, "noise_kinds_", None)
        if noise_kinds is None or fitted is None or not self.noise:
            return
        kinds = _check_kinds(noise_kinds, len(fitted))
        if not np.array_equal(kinds, fitted):
            raise LogitguardError(f"the noise queries are of kinds {kinds.tolist()}; this detector was fitted on "
                                  f"{fitted.tolist()}")

    def _check_table_kinds(self, table: LogitTable) -> None:
        if self.noise:
            self._check_query_kinds(noise_kinds_from_metadata(table.metadata))

    # -- features ------------------------------------------------------------------------------

    def log_odds_changes(self, logits: np.ndarray, noisy: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes y (N,) and raw features g (N, K, C) for logits (N, C) and noise queries
        (N, K, C): the noise-induced log-odds changes (single-shot: the log-odds, K=1). g[n, :, y_n] = 0."""
        logits = logits.astype(np.float64)
        y = logits.argmax(axis=1)
        if self.noise:
            if noisy is None:
                raise LogitguardError(f"the {self.kind!r} detector needs noise queries (column 'noisy_logits')")
            g = noisy.astype(np.float64) - logits[:, None, :]
        else:
            g = logits[:, None, :]
        return y, g - np.take_along_axis(g, y[:, None, None], axis=2)

    def grouped_changes(self, logits: np.ndarray, noisy: np.ndarray | None,
                        group: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes y (N,) and the log-odds changes averaged within each query group (N, G, C).

        `group` (K,) gives each query's group (default `query_group_`, the z-scored groups)."""
        group = self.query_group_ if group is None else group
        y, g = self.log_odds_changes(logits, noisy)
        if g.shape[1] != len(group):
            raise LogitguardError(f"the input has {g.shape[1]} noise queries; this detector was fitted on {len(group)}")
        return y, _group_means(g, group)

    def kind_features(self, logits: np.ndarray, noisy: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes y (N,) and the reference classifier's raw features (N, E*C): the draw average of
        the log-odds changes for each of the E noise kinds (column y of each kind is 0)."""
        group = _kind_ids(self.noise_kinds_) if self.noise else np.zeros(1, dtype=np.int64)
        y, a = self.grouped_changes(logits, noisy, group)
        return y, a.reshape(len(a), -1)

    def features(self, logits: np.ndarray, noisy: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes y (N,) and z-scored features (N, C), averaged over query groups; -inf at z = y.

        Takes validated float64 arrays (`score_samples` and `correct` validate theirs)."""
        self._check_moments()
        scale = self._inverse_scale
        y = np.empty(len(logits), dtype=np.int64)
        z = np.empty(logits.shape)
        for rows in _row_batches(len(logits), len(self.query_group_) * scale.shape[2]):
            yb, a = self.grouped_changes(logits[rows], None if noisy is None else noisy[rows])
            if a.shape[2] != scale.shape[2]:
                raise LogitguardError(f"the input has {a.shape[2]} classes; this detector was fitted on {scale.shape[2]}")
            a -= self.mean_[yb]
            a *= scale[yb]
            zb = a.sum(axis=1)
            zb[np.arange(len(yb)), yb] = -np.inf
            y[rows], z[rows] = yb, zb
        return y, z

    @cached_property
    def _inverse_scale(self) -> np.ndarray:
        """1 / (G σ), (C, G, C): multiplying by it and summing over the G groups averages their z-scores."""
        return 1.0 / (self.std_ * self.std_.shape[1])

    # -- fit, score, correct -----------------------------------------------------------------

    def _fit(self, logits: np.ndarray, attacked: np.ndarray, labels: np.ndarray | None,
             noisy: np.ndarray | None) -> None:
        noisy = noisy if self.noise else None
        self._adopt_kinds(getattr(self, "_pending_kinds", None), 1 if noisy is None else noisy.shape[1])
        clean_logits, clean_noisy = logits[~attacked], None if noisy is None else noisy[~attacked]
        moments = _Moments(logits.shape[1], int(self.query_group_.max()) + 1)
        moments.add(self, clean_logits, clean_noisy)
        self.mean_, self.std_ = moments.result(self.min_rows)
        self.__dict__.pop("_inverse_scale", None)  # derived from mean_ and std_
        c = logits.shape[1]
        self.pair_threshold_ = np.zeros((c, c))
        if self.thresholds == "pair":
            y, z = self.features(clean_logits, clean_noisy)
            self.pair_threshold_ = _class_quantiles(y, z, 1.0 - self.fpr, self.min_rows)
        if self.correction != "argmax":
            self._check_correction_data(c, labels, attacked)
            hit_logits, hit_noisy = logits[attacked], None if noisy is None else noisy[attacked]
            rule = self.kind_features if self.correction == "reference" else self.features
            self._fit_logistic_features(*rule(hit_logits, hit_noisy), labels[attacked], c)

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
        from .base import as_float64

        c = stream.keys.num_classes
        self._adopt_kinds(noise_kinds_from_metadata(stream.keys.metadata) if self.noise else None,
                          self.n_queries_ if self.noise else 1)
        if self.correction != "argmax":
            self._check_correction_data(c, labels, attacked)
        moments = _Moments(c, int(self.query_group_.max()) + 1)
        stream.each(rows[~attacked], lambda _, z, q: moments.add(self, *as_float64(z, q)), noise=self.noise)
        self.mean_, self.std_ = moments.result(self.min_rows)
        self.__dict__.pop("_inverse_scale", None)  # derived from mean_ and std_

        def features(z: np.ndarray, q: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            return self.features(*as_float64(z, q))

        def kind_features(z: np.ndarray, q: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            return self.kind_features(*as_float64(z, q))

        self.pair_threshold_ = np.zeros((c, c))
        if self.thresholds == "pair":
            clean = rows[~attacked]
            take = self._stream_sample(len(clean), max_rows, 8 * c)
            y, z = stream.collect(clean[take], features, noise=self.noise)
            self.pair_threshold_ = _class_quantiles(y, z, 1.0 - self.fpr, self.min_rows)
        if self.correction != "argmax":
            hit = np.flatnonzero(attacked)
            take = self._stream_sample(len(hit), max_rows, 8 * c * len(self.query_group_))
            rule = kind_features if self.correction == "reference" else features
            y, x = stream.collect(rows[hit[take]], rule, noise=self.noise)
            self._fit_logistic_features(y, x, labels[hit[take]], c)

    def _scores(self, logits: np.ndarray, noisy: np.ndarray | None) -> np.ndarray:
        y, z = self.features(logits, noisy if self.noise else None)
        return (z - self.pair_threshold_[y]).max(axis=1)

    def score_samples(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None, *,
                      features: np.ndarray | None = None, noise_kinds: np.ndarray | None = None) -> np.ndarray:
        """`Detector.score_samples`; `noise_kinds` (K,), when given, must be the kinds the detector was fitted on."""
        self._check_fitted()
        self._check_query_kinds(noise_kinds)
        return super().score_samples(logits, noisy_logits, features=features)

    def flag(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None, *,
             features: np.ndarray | None = None, noise_kinds: np.ndarray | None = None) -> np.ndarray:
        """Flags (N,) bool at the calibrated threshold (see `score_samples`)."""
        return self.score_samples(logits, noisy_logits, features=features, noise_kinds=noise_kinds) > self.threshold_

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
        noisy = noisy if self.noise else None
        y, z = self.features(logits, noisy)
        labels = z.argmax(axis=1)
        if self.correction != "argmax":
            use = self.logistic_fitted_[y]
            if use.any():
                if self.correction == "reference":
                    x = self.kind_features(logits[use], None if noisy is None else noisy[use])[1]
                else:
                    x = np.where(np.isfinite(z[use]), z[use], 0.0)
                weights, bias = self.logistic_weights_[y[use]], self.logistic_bias_[y[use]]
                labels[use] = (np.einsum("nf,nlf->nl", x, weights) + bias).argmax(axis=1)
        return labels

    def correct_table(self, table: LogitTable) -> np.ndarray:
        """`correct` for every row of `table`."""
        self._check_fitted()
        self._check_table_kinds(table)
        return self.correct(table.logits, self._table_noise(table))

    def _fit_logistic_features(self, y: np.ndarray, x: np.ndarray, labels: np.ndarray, c: int) -> None:
        """The correction classifiers from predicted classes y (N,), features x (N, F) and true labels (N,).

        ``logistic``: one multinomial logistic regression per predicted class with at least `min_rows` rows and
        two labels, else the argmax rule. ``reference``: only rows whose true label differs from y (successful
        attacks); a class seen with one label always answers it, with none it uses the argmax rule. Classes a
        model never saw get bias -inf, so y itself is never returned by a ``reference`` model."""
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels).astype(np.int64)
        if self.correction == "reference":
            keep = (labels != y) & (labels >= 0) & (labels < c)
            if not keep.any():
                raise LogitguardError("correction='reference' learns from successful attacks (attacked rows the "
                                      "model gets wrong, with their true labels); there are none")
            y, x, labels = y[keep], x[keep], labels[keep]
        x = np.where(np.isfinite(x), x, 0.0)
        self.logistic_weights_ = np.zeros((c, c, x.shape[1]))
        self.logistic_bias_ = np.full((c, c), -np.inf)
        self.logistic_fitted_ = np.zeros(c, dtype=bool)
        for cls in np.unique(y):  # one small model per predicted class (fit time only)
            rows = y == cls
            seen = np.unique(labels[rows])
            if self.correction == "reference" and len(seen) == 1:
                self.logistic_bias_[cls, seen[0]] = 0.0
                self.logistic_fitted_[cls] = True
                continue
            if self.correction == "logistic" and (rows.sum() < self.min_rows or len(seen) < 2):
                continue
            model = LogisticRegression(max_iter=1000).fit(x[rows], labels[rows])
            coef, bias = model.coef_, model.intercept_
            if len(seen) == 2:  # sklearn's binary form: one row for the second class
                coef, bias = np.vstack([-coef / 2, coef / 2]), np.array([-bias[0] / 2, bias[0] / 2])
            self.logistic_weights_[cls, seen] = coef
            self.logistic_bias_[cls, seen] = bias
            self.logistic_fitted_[cls] = True

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
        self.__dict__.pop("_inverse_scale", None)

    def _check_moments(self) -> None:
        """The class moments exist: set by `fit` before the threshold is (`features` runs mid-fit)."""
        self._check_fitted("mean_")


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


class SingleShotOddsTest(OddsTest):
    """The odds test without noise queries: z-scored log-odds of the row itself (weaker; see module)."""

    kind = "odds-single"
    needs_noise = False
    noise = False


class _Moments:
    """Running per-class sums of the group-averaged raw features (and their squares) of clean rows grouped by
    predicted class (`queries`: the number of query groups G): `add` batch after batch, then `result`. Rows
    are sorted by class and summed per run (`np.add.reduceat`)."""

    def __init__(self, num_classes: int, queries: int) -> None:
        self.c, self.k = num_classes, queries
        self.sums = np.zeros((num_classes, queries * num_classes))
        self.squares = np.zeros((num_classes, queries * num_classes))
        self.counts = np.zeros(num_classes)
        self.n = 0

    def add(self, odds: OddsTest, logits: np.ndarray, noisy: np.ndarray | None) -> None:
        for rows in _row_batches(len(logits), self.k * self.c):
            y, g = odds.grouped_changes(logits[rows], None if noisy is None else noisy[rows])
            if g.shape[1:] != (self.k, self.c):
                raise LogitguardError(f"rows have {g.shape[1]} query groups x {g.shape[2]} classes; earlier ones had "
                                      f"{self.k} x {self.c}")
            order = np.argsort(y, kind="stable")
            sorted_y = y[order]
            flat = g.reshape(len(y), self.k * self.c)[order].astype(np.float64, copy=False)
            starts = np.flatnonzero(np.r_[True, sorted_y[1:] != sorted_y[:-1]])  # first row of each class run
            present = sorted_y[starts]  # distinct classes, so += below adds each run once
            self.sums[present] += np.add.reduceat(flat, starts, axis=0)
            self.squares[present] += np.add.reduceat(np.square(flat, out=flat), starts, axis=0)
            self.counts += np.bincount(y, minlength=self.c)
            self.n += len(y)

    def result(self, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (C, G, C); classes with fewer than `min_rows` rows get the pooled moments of all rows."""
        if not self.n:
            raise LogitguardError("no clean rows to learn the odds statistics from")
        c, k, n = self.c, self.k, self.n
        sums, squares, counts = self.sums, self.squares, self.counts[:, None]
        pooled_mean = sums.sum(axis=0) / n
        pooled_var = squares.sum(axis=0) / n - pooled_mean**2
        enough = counts >= min_rows
        mean = np.where(enough, sums / np.maximum(counts, 1), pooled_mean)
        var = np.where(enough, squares / np.maximum(counts, 1) - mean**2, pooled_var)
        std = np.maximum(np.sqrt(np.maximum(var, 0.0)), _MIN_STD)
        return mean.reshape(c, k, c), std.reshape(c, k, c)


def _row_batches(rows: int, per_row: int, budget: int = 1 << 20) -> Iterator[slice]:
    """Row slices holding about `budget` elements each: (B, K, C) temporaries stay cache-sized."""
    step = max(1, budget // max(per_row, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _class_quantiles(y: np.ndarray, z: np.ndarray, q: float, min_rows: int) -> np.ndarray:
    """Per-class q-quantile of each column of z (N, C) over rows grouped by y: (C, C); pooled for small classes."""
    c = z.shape[1]
    finite = np.where(np.isfinite(z), z, np.nan)
    pooled = np.nanquantile(finite, q, axis=0)
    out = np.tile(np.nan_to_num(pooled, nan=0.0), (c, 1))
    frame = pd.DataFrame(finite)
    counts = np.bincount(y, minlength=c)
    per_class = frame.groupby(y).quantile(q)
    keep = [cls for cls in per_class.index if counts[cls] >= min_rows]
    out[keep] = per_class.loc[keep].to_numpy()
    return np.nan_to_num(out, nan=0.0)  # the (y, y) entries: never used (feature is -inf there)
