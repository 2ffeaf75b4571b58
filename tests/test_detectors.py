"""Detectors, the SVM corrector and the gated defense on real digits logits."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from logitguard import LogitguardError, LogitTable
from logitguard.defenses.gated import GatedDefense, load_corrector
from logitguard.defenses.detectors import KINDS, OddsTest, load_detector, make_detector
from logitguard.defenses.detectors.baselines import energy_score, max_logit_score, msp_score, nonme_score
from logitguard.evaluation.evaluate import detection_table, evaluate
from logitguard.evaluation.metrics import tpr_at_fpr
from logitguard.defenses.svm import SVMCorrector


@pytest.fixture(scope="module")
def fitted(digits_feature_table):
    # The feature table: the same rows, plus the features and insen columns kdensity and insen read.
    return {kind: make_detector(kind).fit_table(digits_feature_table.select(split="train")) for kind in KINDS}


@pytest.fixture(scope="module")
def test_rows(digits_feature_table):
    return digits_feature_table.select(split="test")


# -- the shared contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_detector_keeps_the_contract(kind, fitted, test_rows, digits_split_table, tmp_path):
    detector = fitted[kind]
    scores = detector.score_table(test_rows)
    assert scores.shape == (len(test_rows),) and np.isfinite(scores).all()
    flags = detector.flag_table(test_rows)
    assert flags.dtype == bool and np.array_equal(flags, scores > detector.threshold_)
    # Calibrated on clean rows: the achieved FPR never exceeds the 5% target...
    assert 0.0 < detector.achieved_fpr_ <= 0.05
    # ...and held-out clean rows are flagged at a similar rate. The test digits are by other writers than
    # the train ones: a density of raw pixels (kdensity's features here) drifts most (15.6% flagged).
    clean_test = test_rows.select(attacks="clean")
    assert detector.flag_table(clean_test).mean() < (0.2 if kind == "kdensity" else 0.15)
    # Round trip through a file: identical scores, threshold and parameters.
    loaded = load_detector(detector.save(tmp_path / f"{kind}.npz"))
    assert type(loaded) is type(detector) and loaded.get_params() == detector.get_params()
    np.testing.assert_array_equal(loaded.score_table(test_rows), scores)
    assert loaded.threshold_ == detector.threshold_
    # Recalibrating to a stricter FPR raises the threshold and leaves the original untouched.
    strict = loaded.with_fpr(0.01)
    assert strict.threshold_ >= detector.threshold_ and strict.achieved_fpr_ <= 0.01
    assert loaded.threshold_ == detector.threshold_ and strict.fpr == 0.01 and loaded.fpr == 0.05


@pytest.mark.parametrize("kind", ["msp", "maxlogit", "energy", "learned", "learned-noisy", "learned-ranked",
                                  "odds-single"])
def test_higher_scores_mean_adversarial(kind, fitted, test_rows):
    """On the logistic regression, these detectors separate successful FGSM rows from clean ones."""
    result = detection_table(test_rows, {kind: fitted[kind]}, attacks=["fgsm"]).iloc[0]
    assert result["auroc"] > 0.75


def test_detection_table_matches_hand_computed_metrics(fitted, test_rows):
    detector = fitted["msp"]
    result = detection_table(test_rows, {"msp": detector}, attacks=["fgsm"]).iloc[0]
    clean = test_rows.select(attacks="clean")
    attacked = test_rows.select(attacks="fgsm")
    hit = (clean.logits.argmax(1) == clean.labels) & (attacked.logits.argmax(1) != attacked.labels)
    neg, pos = msp_score(clean.logits), msp_score(attacked.logits)[hit]
    assert result["positives"] == hit.sum() and result["negatives"] == len(clean)
    assert result["auroc"] == pytest.approx(roc_auc_score(np.r_[0 * neg, 0 * pos + 1], np.r_[neg, pos]))
    # pytorch-ood's metrics beside it, each inside its bootstrap interval.
    assert result["aupr_out"] == pytest.approx(average_precision_score(np.r_[0 * neg, 0 * pos + 1], np.r_[neg, pos]))
    for name in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"):
        assert result[f"{name}_low"] <= result[name] <= result[f"{name}_high"]
    assert result["fpr_at_5"] <= 0.05 and result["fpr_at_1"] <= 0.01
    threshold = np.sort(neg)[int(np.ceil(0.95 * len(neg))) - 1]
    assert result["tpr_at_5"] == pytest.approx((pos > threshold).mean())


def test_tpr_at_fpr_reports_the_fpr_it_reached():
    clean = np.array([0.0, 0.0, 0.0, 1.0])  # ties: no threshold flags exactly 30%
    tpr, achieved = tpr_at_fpr(clean, np.array([0.5, 2.0]), 0.3)
    assert achieved == 0.25 and tpr == 1.0  # the lowest threshold within the budget: 0.0
    assert tpr_at_fpr(clean, np.array([0.5, 2.0]), 0.2) == (0.5, 0.0)  # 25% > 20%: threshold 1.0


# -- baselines -------------------------------------------------------------------------------------


def test_baseline_scores_follow_their_formulas():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(msp_score(logits), -p.max(1))
    np.testing.assert_allclose(max_logit_score(logits), [-2.0, 0.0])
    np.testing.assert_allclose(energy_score(logits), -np.log(np.exp(logits).sum(1)))
    # Non-maximal entropy of row 0: softmax entries 1 and 2 renormalised; negated.
    q = p[0, 1:] / p[0, 1:].sum()
    assert nonme_score(logits)[0] == pytest.approx((q * np.log(q)).sum())
    assert nonme_score(logits)[1] == pytest.approx(-np.log(2))  # two equal non-max entries


# -- the odds test ---------------------------------------------------------------------------------


def _odds_by_loops(clean: LogitTable, rows: LogitTable) -> np.ndarray:
    """Reference: the odds score written sample by sample and pair by pair."""
    c = clean.num_classes
    k = clean.noisy_logits.shape[1]
    by_class: dict[int, list[np.ndarray]] = {y: [] for y in range(c)}
    for logits, noisy in zip(clean.logits.astype(float), clean.noisy_logits.astype(float)):
        y = int(np.argmax(logits))
        g = np.zeros((k, c))
        for q in range(k):
            for z in range(c):
                g[q, z] = (noisy[q, z] - noisy[q, y]) - (logits[z] - logits[y])
        by_class[y].append(g)
    scores = []
    for logits, noisy in zip(rows.logits.astype(float), rows.noisy_logits.astype(float)):
        y = int(np.argmax(logits))
        stack = np.array(by_class[y])
        mean, std = stack.mean(0), np.maximum(stack.std(0), 1e-6)
        best = -np.inf
        for z in range(c):
            if z == y:
                continue
            zs = [((noisy[q, z] - noisy[q, y]) - (logits[z] - logits[y]) - mean[q, z]) / std[q, z] for q in range(k)]
            best = max(best, float(np.mean(zs)))
        scores.append(best)
    return np.array(scores)


def test_vectorised_odds_test_equals_the_loop_reference(digits_train, digits_split_table, test_rows):
    train_clean = digits_split_table.select(split="train", attacks="clean")
    counts = np.bincount(train_clean.logits.argmax(1), minlength=10)
    assert counts.min() >= 10  # every class has its own statistics (no pooled fallback involved)
    odds = OddsTest().fit_table(digits_train)
    np.testing.assert_allclose(odds.score_table(test_rows), _odds_by_loops(train_clean, test_rows), rtol=1e-9, atol=1e-9)


def test_odds_pair_thresholds_and_corrections(digits_train, digits_split_table, test_rows):
    pair_mode = OddsTest(thresholds="pair").fit_table(digits_train)
    train_clean = digits_split_table.select(split="train", attacks="clean")
    y, z = pair_mode.features(train_clean.logits.astype(float), train_clean.noisy_logits.astype(float))
    # Per (y, z) thresholds are the clean 95% quantiles: about 5% of clean rows exceed each.
    exceed = (z > pair_mode.pair_threshold_[y])[np.isfinite(z)]
    assert 0.02 < exceed.mean() < 0.08
    logistic = OddsTest(correction="logistic").fit_table(digits_train)
    labels = logistic.correct_table(test_rows)
    assert labels.shape == (len(test_rows),) and logistic.logistic_fitted_.any()
    argmax_labels = OddsTest().fit_table(digits_train).correct_table(test_rows)
    y_test, z_test = pair_mode.features(test_rows.logits.astype(float), test_rows.noisy_logits.astype(float))
    np.testing.assert_array_equal(argmax_labels, z_test.argmax(1))
    assert (argmax_labels != y_test).all()  # the argmax rule never keeps the predicted class


def test_odds_refuses_tables_without_noise_queries(digits_train):
    bare = LogitTable.from_arrays(logits=digits_train.logits, sample_id=digits_train.sample_id,
                                  split=digits_train.split, attack=digits_train.attack, label=digits_train.labels)
    with pytest.raises(LogitguardError, match=re.escape("the 'odds' detector needs noise queries (column 'noisy_logits')")):
        OddsTest().fit_table(bare)
    assert make_detector("odds-single").fit_table(bare).score_table(bare).shape == (len(bare),)
    with pytest.raises(LogitguardError, match=r"use the method's \*_table form"):
        OddsTest().fit(bare)


# -- SVM corrector and gating ------------------------------------------------------------------------


def test_svm_corrector_matches_scikit_learn_and_round_trips(digits_train, digits_split_table, test_rows, tmp_path):
    from sklearn.svm import SVC

    svm = SVMCorrector().fit_table(digits_train, "fgsm")
    train = digits_split_table.select(split="train", attacks="fgsm")
    scale = lambda x: (x - svm.center_) / svm.scale_  # noqa: E731
    reference = SVC().fit(scale(train.logits.astype(np.float64)), train.labels)
    x = test_rows.logits.astype(np.float64)
    np.testing.assert_array_equal(svm.predict(x), reference.predict(scale(x)))
    reference.decision_function_shape = "ovo"
    np.testing.assert_allclose(svm.decision_function(x), reference.decision_function(scale(x)), atol=1e-9)
    attacked = test_rows.select(attacks="fgsm")
    assert svm.score(attacked.logits, attacked.labels) > (attacked.logits.argmax(1) == attacked.labels).mean() + 0.1
    loaded = load_corrector(svm.save(tmp_path / "svm.npz"))
    np.testing.assert_array_equal(loaded.predict(x), svm.predict(x))


def test_gated_defense_corrects_only_flagged_rows(digits_train, digits_test, fitted, test_rows):
    detector = fitted["msp"]
    svm = SVMCorrector().fit_table(digits_train, "fgsm")
    gated = GatedDefense(detector, svm)
    labels, flags = _label_and_flags(gated.check_table(test_rows))
    np.testing.assert_array_equal(labels[~flags], test_rows.logits.argmax(1)[~flags])
    np.testing.assert_array_equal(labels[flags], svm.predict(test_rows.logits[flags]))
    results = evaluate(digits_test, {"svm": svm, "gated": gated})
    full = results[(results["attack"] == "fgsm") & (results["subset"] == "full")].set_index("defense")
    # The SVM alone pays in clean accuracy; gating keeps most of it and still recovers attacked rows.
    assert full.at["gated", "clean_accuracy"] > full.at["svm", "clean_accuracy"]
    assert full.at["gated", "robust_accuracy"] > full.at["none", "robust_accuracy"] + 0.1
    defended = gated.defend_table(test_rows)
    np.testing.assert_array_equal(defended.column("pred"), labels)
    np.testing.assert_array_equal(defended.column("flagged"), flags)
    np.testing.assert_array_equal(defended.logits, test_rows.logits)


# -- files and errors ------------------------------------------------------------------------------


def test_loading_refuses_what_is_not_a_detector(tmp_path, fitted):
    missing = tmp_path / "none.npz"
    with pytest.raises(LogitguardError, match=f"^no such detector file: {re.escape(str(missing))}$"):
        load_detector(missing)
    pickled = tmp_path / "pickled.npz"
    with open(pickled, "wb") as f:
        np.savez(f, header=np.array([{"format": "logitguard.Detector"}], dtype=object))
    with pytest.raises(LogitguardError, match=re.escape(f"{pickled}: not a logitguard detector file")):
        load_detector(pickled)
    with pytest.raises(LogitguardError, match=re.escape("a 'msp' detector cannot correct labels")):
        load_corrector(fitted["msp"].save(tmp_path / "msp.npz"))
    with pytest.raises(LogitguardError, match=re.escape("unknown detector kind 'lof'; choose from msp, maxlogit")):
        make_detector("lof")
    with pytest.raises(LogitguardError, match=re.escape("fpr must be in (0, 1), got 0")):
        make_detector("msp", fpr=0)


def _label_and_flags(decision):
    """(defended labels, flags) of a `Decision`."""
    return decision.label, decision.flagged


def test_ranked_noise_features_ignore_which_classes_moved():
    """`learned-ranked`'s extra block is the same whichever classes the noise moved (class columns permuted),
    while the per-class block it shares with `learned-noisy` follows the classes; without the ranked block
    the features are `learned-noisy`'s."""
    from logitguard.defenses.math.learned import learned_features

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10))
    noisy = logits[:, None, :] + rng.normal(scale=0.3, size=(50, 4, 10))
    perm = rng.permutation(10)
    plain, ranked = learned_features(logits, noisy), learned_features(logits, noisy, ranked=True)
    moved = learned_features(logits[:, perm], noisy[:, :, perm], ranked=True)
    assert plain.shape == (50, 50) and ranked.shape == (50, 70)
    np.testing.assert_array_equal(ranked[:, :50], plain)
    np.testing.assert_allclose(moved[:, 50:], ranked[:, 50:], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moved[:, 30:40], ranked[:, 30:40][:, perm], rtol=1e-12, atol=1e-12)
    assert not np.allclose(moved[:, 30:40], ranked[:, 30:40])
    # The largest change's mean is at least the second largest's, row by row.
    assert (ranked[:, 50] >= ranked[:, 51]).all()
