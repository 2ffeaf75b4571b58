"""The odds test's reference-fidelity options: per-kind aggregation, the reference correction classifier."""

from __future__ import annotations

import re

import numpy as np
import pytest

from logitguard import LogitguardError, LogitTable
from logitguard.defenses.detectors import OddsTest, load_detector
from logitguard.defenses.detectors.odds import noise_kinds_from_metadata

KINDS = np.array(["gaussian:0.05", "sign:0.05", "gaussian:0.05"])  # queries 0 and 2 are one kind


def _tiny() -> tuple[np.ndarray, np.ndarray]:
    """Four clean rows, all predicted class 0, 3 classes, K=3 queries with hand-picked changes."""
    logits = np.array([[5.0, 1.0, 0.0], [6.0, 2.0, 1.0], [5.0, 0.0, 2.0], [7.0, 1.0, 1.0]])
    g = np.array([  # g[n, k, z]: the log-odds change of query k (class 0 column stays 0)
        [[0, 1, 0], [0, 2, 1], [0, 3, 2]],
        [[0, 0, 1], [0, 1, 0], [0, 2, 3]],
        [[0, 2, 2], [0, 0, 2], [0, 0, 0]],
        [[0, 1, 1], [0, 3, 1], [0, 1, 1]],
    ], dtype=float)
    return logits, logits[:, None, :] + g


def test_per_kind_aggregation_by_hand():
    logits, noisy = _tiny()
    odds = OddsTest(aggregation="per-kind", min_rows=1).fit(logits, noisy_logits=noisy, noise_kinds=KINDS)
    g = (noisy - logits[:, None, :])[:, :, 1:]  # the pairs (0, z) for z = 1, 2
    # By hand: the draw average of each kind, z-scored per (kind, z) over the clean rows, then the kind mean.
    gauss = (g[:, 0] + g[:, 2]) / 2
    sign = g[:, 1]
    z = [(a - a.mean(0)) / a.std(0) for a in (gauss, sign)]
    expected = ((z[0] + z[1]) / 2).max(axis=1)
    np.testing.assert_allclose(odds.score_samples(logits, noisy), expected, rtol=1e-12)
    assert odds.query_group_.tolist() == [0, 1, 0] and odds.mean_.shape == (3, 2, 3)
    # The per-query default z-scores all three queries separately: a different score.
    per_query = OddsTest(min_rows=1).fit(logits, noisy_logits=noisy)
    zq = (g - g.mean(0)) / g.std(0)
    np.testing.assert_allclose(per_query.score_samples(logits, noisy), zq.mean(1).max(1), rtol=1e-12)
    assert not np.allclose(per_query.score_samples(logits, noisy), expected)
    # "mean": the K-average z-scored once.
    mean = OddsTest(aggregation="mean", min_rows=1).fit(logits, noisy_logits=noisy)
    avg = g.mean(1)
    np.testing.assert_allclose(mean.score_samples(logits, noisy), ((avg - avg.mean(0)) / avg.std(0)).max(1),
                               rtol=1e-12)


def _with_recipe(table: LogitTable, kinds: list[tuple[str, float]]) -> LogitTable:
    recipe = [{"kind": k, "scale": s} for k, s in kinds]
    return LogitTable.from_arrays(logits=table.logits, noisy_logits=table.noisy_logits, label=table.labels,
                                  sample_id=table.sample_id, split=table.split, attack=table.attack,
                                  metadata={"noise": {"queries": len(recipe), "recipe": recipe}})


@pytest.fixture(scope="module")
def recipe_table(digits_split_table):
    return _with_recipe(digits_split_table, [("gaussian", 0.05), ("uniform", 0.1), ("gaussian", 0.05)])


def test_reference_correction_learns_only_successful_attacks_and_never_the_flagged_class(recipe_table):
    train = recipe_table.select(split="train")
    odds = OddsTest(aggregation="per-kind", correction="reference").fit_table(train)
    assert odds.noise_kinds_.tolist() == ["gaussian:0.05", "uniform:0.1", "gaussian:0.05"]
    # One model per predicted class over the E=2 kinds' raw averages (E*C features); the class itself never seen.
    assert odds.logistic_weights_.shape == (10, 10, 20)
    assert np.isneginf(np.diagonal(odds.logistic_bias_)).all()
    test = recipe_table.select(split="test")
    labels, y = odds.correct_table(test), test.logits.argmax(1)
    assert (labels != y).all()
    # Trained on successful attacks only: a failed attacked row (label = prediction) changes nothing.
    rows = train.select(attacks=["clean", "fgsm"])
    attacked = rows.attack != "clean"
    hit = attacked & (rows.logits.argmax(1) != rows.labels)
    assert 0 < hit.sum() < attacked.sum()
    kinds = odds.noise_kinds_
    only_hits = OddsTest(correction="reference").fit(rows.logits[~attacked | hit], attacked[~attacked | hit],
                                                     labels=rows.labels[~attacked | hit],
                                                     noisy_logits=rows.noisy_logits[~attacked | hit], noise_kinds=kinds)
    everything = OddsTest(correction="reference").fit(rows.logits, attacked, labels=rows.labels,
                                                      noisy_logits=rows.noisy_logits, noise_kinds=kinds)
    np.testing.assert_array_equal(only_hits.logistic_weights_, everything.logistic_weights_)
    np.testing.assert_array_equal(only_hits.logistic_bias_, everything.logistic_bias_)
    # A table without successful attacks leaves nothing to learn from.
    failed = attacked & ~hit
    with pytest.raises(LogitguardError, match="learns from successful attacks"):
        OddsTest(correction="reference").fit(rows.logits[~attacked | failed], attacked[~attacked | failed],
                                             labels=rows.labels[~attacked | failed],
                                             noisy_logits=rows.noisy_logits[~attacked | failed], noise_kinds=kinds)


def test_persistence_round_trip_and_kind_checks(recipe_table, tmp_path):
    train, test = recipe_table.select(split="train"), recipe_table.select(split="test")
    odds = OddsTest(aggregation="per-kind", thresholds="pair", correction="reference").fit_table(train)
    loaded = load_detector(odds.save(tmp_path / "odds.npz"))
    assert loaded.get_params() == odds.get_params()
    np.testing.assert_array_equal(loaded.noise_kinds_, odds.noise_kinds_)
    np.testing.assert_array_equal(loaded.score_table(test), odds.score_table(test))
    np.testing.assert_array_equal(loaded.correct_table(test), odds.correct_table(test))
    # The arrays API agrees with the table API, and queries of other kinds are refused.
    np.testing.assert_array_equal(loaded.score_samples(test.logits, test.noisy_logits, noise_kinds=odds.noise_kinds_),
                                  odds.score_table(test))
    other = _with_recipe(test, [("sign", 0.05)] * 3)
    with pytest.raises(LogitguardError, match=re.escape("the noise queries are of kinds ['sign:0.05'")):
        loaded.score_table(other)
    with pytest.raises(LogitguardError, match="noise_kinds must give the kind of each of the 3 noise queries"):
        loaded.flag(test.logits, test.noisy_logits, noise_kinds=["gaussian:0.05"])


def test_invalid_options_and_missing_kinds(digits_split_table):
    rows = digits_split_table.select(split="train")
    for params, message in [({"aggregation": "median"}, "aggregation must be one of"),
                            ({"correction": "svm"}, "correction must be one of"),
                            ({"thresholds": "class"}, "thresholds must be 'pair' or 'global'"),
                            ({"min_rows": 0}, "min_rows must be an integer >= 1")]:
        with pytest.raises(LogitguardError, match=message):
            OddsTest(**params).fit_table(rows)
    # The digits table records no noise recipe: per-kind and reference need the kinds spelled out.
    for params in ({"aggregation": "per-kind"}, {"correction": "reference"}):
        with pytest.raises(LogitguardError, match="groups the noise queries by kind.*noise_kinds="):
            OddsTest(**params).fit_table(rows)
    with pytest.raises(LogitguardError, match="noise metadata is not a recipe"):
        noise_kinds_from_metadata({"noise": {"queries": 3}})
    fitted = OddsTest(aggregation="per-kind").fit(rows.logits, noisy_logits=rows.noisy_logits,
                                                   noise_kinds=["gaussian:0.05"] * 3)
    assert fitted.query_group_.tolist() == [0, 0, 0]
