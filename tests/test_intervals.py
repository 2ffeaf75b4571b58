"""95% intervals: exact binomial, paired and stratified bootstraps, and pytorch-ood's detection metrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from logitguard.evaluation.intervals import (binomial_interval, paired_bootstrap_interval,
                                             stratified_bootstrap_interval, with_interval)
from logitguard.evaluation.metrics import detection_metrics, weighted_detection_metrics


def test_clopper_pearson_matches_known_values():
    low, high = binomial_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.3085, abs=1e-4)
    low, high = binomial_interval(5, 10)
    assert (low, high) == (pytest.approx(0.1871, abs=1e-4), pytest.approx(0.8129, abs=1e-4))
    low, high = binomial_interval(10, 10)
    assert low == pytest.approx(0.6915, abs=1e-4) and high == 1.0
    # Vectorised, and undefined without samples.
    low, high = binomial_interval(np.array([0, 5, 10, 0]), np.array([10, 10, 10, 0]))
    np.testing.assert_allclose(low[:3], [0.0, 0.1871, 0.6915], atol=1e-4)
    assert np.isnan(low[3]) and np.isnan(high[3])


def test_paired_bootstrap_covers_the_true_difference_and_is_seeded():
    rng = np.random.default_rng(0)
    # 2,000 samples: b right with probability 0.6, a keeps b and rescues a further 10% of samples.
    b = rng.random(2000) < 0.6
    a = b | (rng.random(2000) < 0.1)
    truth = a.mean() - b.mean()
    low, high = paired_bootstrap_interval(a, b)
    assert low < truth < high and low > 0  # the pairing makes a small gain significant
    assert (low, high) == paired_bootstrap_interval(a, b)  # same seed, same interval
    assert (low, high) != paired_bootstrap_interval(a, b, seed=1)
    # Unpaired noise of the same size would not be this tight: the interval is narrower than the
    # two binomial intervals side by side.
    assert high - low < (binomial_interval(a.sum(), 2000)[1] - binomial_interval(a.sum(), 2000)[0])
    # Several differences at once share the resamples; identical vectors differ by exactly 0.
    lows, highs = paired_bootstrap_interval(np.stack([a, b]), b)
    assert lows[0] == low and highs[0] == high and lows[1] == highs[1] == 0.0


def test_stratified_bootstrap_resamples_each_class_apart():
    seen = []

    def statistic(neg, pos):
        seen.append((neg.sum(axis=1), pos.sum(axis=1)))
        return pos.mean(axis=1) * 0 + 1.0

    low, high = stratified_bootstrap_interval(statistic, 7, 3, resamples=50)
    neg, pos = seen[0]
    assert (neg == 7).all() and (pos == 3).all() and low == high == 1.0


def test_detection_metrics_equal_sklearn_and_carry_intervals():
    rng = np.random.default_rng(1)
    clean = np.round(rng.normal(size=200), 1)  # rounded: ties across classes count half
    attacked = np.round(rng.normal(1.0, 1.0, size=80), 1)
    got = detection_metrics(clean, attacked)
    truth = np.r_[np.zeros(200), np.ones(80)]
    scores = np.r_[clean, attacked]
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    assert got["auroc"] == pytest.approx(roc_auc_score(truth, scores))
    assert got["aupr_out"] == pytest.approx(average_precision_score(truth, scores))
    assert got["aupr_in"] == pytest.approx(average_precision_score(1 - truth, -scores))
    assert got["fpr_at_95_tpr"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95)])
    for name in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"):
        assert got[f"{name}_low"] <= got[name] <= got[f"{name}_high"]
    assert got == detection_metrics(clean, attacked)  # seeded
    # A weighting by counts is the metric of the repeated rows.
    w0, w1 = rng.integers(0, 3, size=200), rng.integers(0, 3, size=80)
    weighted = weighted_detection_metrics(clean, attacked, w0[None], w1[None])[0]
    repeated = detection_metrics(np.repeat(clean, w0), np.repeat(attacked, w1), intervals=False)
    np.testing.assert_allclose(weighted, [repeated[k] for k in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr")])
    empty = detection_metrics(clean, np.array([]))
    assert np.isnan(empty["auroc"]) and np.isnan(empty["auroc_low"])


def test_with_interval_formats_points_and_falls_back():
    record = {"x": 0.634, "x_low": 0.601, "x_high": 0.665, "y": 0.8123, "z": float("nan")}
    assert with_interval(record, "x") == "63.4% [60.1, 66.5]"
    assert with_interval(record, "y", digits=3) == "0.812"
    assert with_interval(record, "z") == "-" and with_interval(record, "missing") == "-"
