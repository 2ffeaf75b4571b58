"""Evaluation tables, transfer matrix and p_clean sweep, checked against metrics computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from logitguard import LogitguardError, TableError, pair
from logitguard.evaluation.evaluate import evaluate, sweep_p_clean, train_per_attack, transfer_matrix
from logitguard.report.evaluation import format_evaluation
from logitguard.evaluation.metrics import ABSTAIN, attack_success_rate, successful_attack

FAST = dict(hidden=256, epochs=40, lr=1e-3)


@pytest.fixture(scope="module")
def correctors(digits_train):
    return train_per_attack(digits_train, ["fgsm", "bim"], progress=False, **FAST)


def test_metrics_follow_their_definitions():
    labels = np.array([0, 1, 2, 3])
    clean = np.array([0, 1, 2, 0])  # 3 correct
    attacked = np.array([0, 2, 1, 3])  # 2 of the 3 clean-correct flipped
    assert attack_success_rate(clean, attacked, labels) == pytest.approx(2 / 3)
    assert np.isnan(attack_success_rate(clean[3:], attacked[3:], labels[3:]))


def test_successful_attack_needs_a_right_clean_row_and_a_wrong_unrejected_attacked_one():
    labels = np.array([0, 1, 2, 3, 4])
    clean = np.array([0, 1, 2, 0, 4])
    attacked = np.array([0, 2, ABSTAIN, 1, 1])
    np.testing.assert_array_equal(successful_attack(clean, attacked, labels), [False, True, False, False, True])


def test_summary_success_rate_skips_samples_without_a_right_clean_row(digits_split_table):
    from logitguard.report.summary import summarize

    table = digits_split_table.select(split="test")
    clean, attacked = pair(table, "fgsm")
    right = clean.logits.argmax(1) == clean.labels
    expected = float((attacked.logits.argmax(1)[right] != attacked.labels[right]).mean())
    # Drop one clean row whose model is right: its attacked row no longer counts.
    drop = np.flatnonzero((table.attack == "clean") & np.isin(table.sample_id, clean.sample_id[right]))[0]
    keep = np.ones(len(table), dtype=bool)
    keep[drop] = False
    entry = {(c["split"], c["attack"]): c for c in summarize(table)["conditions"]}[("test", "fgsm")]
    assert entry["attack_success_rate"] == pytest.approx(expected)
    sample = table.sample_id[drop]
    gone = np.flatnonzero(clean.sample_id[right] == sample)[0]
    mask = np.ones(int(right.sum()), dtype=bool)
    mask[gone] = False
    fooled = attacked.logits.argmax(1)[right] != attacked.labels[right]
    entry = {(c["split"], c["attack"]): c for c in summarize(table.take(keep))["conditions"]}[("test", "fgsm")]
    assert entry["attack_success_rate"] == pytest.approx(float(fooled[mask].mean()))


def test_evaluate_matches_hand_computed_accuracy(digits_test, correctors):
    corrector = correctors["fgsm"]
    results = evaluate(digits_test, {"corrector": corrector})
    assert list(results.columns) == ["attack", "subset", "defense", "samples", "clean_accuracy",
                                     "coverage", "robust_accuracy", "attack_success_rate"]
    assert len(results) == 2 * 2 * 2  # attacks x subsets x defenses
    clean, attacked = pair(digits_test, "fgsm")
    y = clean.labels
    selected = clean.logits.argmax(1) == y
    row = results.set_index(["attack", "subset", "defense"])
    none_full = row.loc[("fgsm", "full", "none")]
    assert none_full["samples"] == len(y)
    assert none_full["clean_accuracy"] == pytest.approx((clean.logits.argmax(1) == y).mean())
    assert none_full["robust_accuracy"] == pytest.approx((attacked.logits.argmax(1) == y).mean())
    none_selected = row.loc[("fgsm", "selected", "none")]
    assert none_selected["samples"] == selected.sum() and none_selected["clean_accuracy"] == 1.0
    assert none_selected["attack_success_rate"] == pytest.approx(1 - none_selected["robust_accuracy"])
    corrected = row.loc[("fgsm", "selected", "corrector")]
    assert corrected["robust_accuracy"] == pytest.approx(
        (corrector.predict(attacked.logits)[selected] == y[selected]).mean())
    assert corrected["robust_accuracy"] > none_selected["robust_accuracy"] + 0.1
    text = format_evaluation(results)
    assert "Selected set" in text and "attacked (corrector)" in text


def test_transfer_matrix_diagonal_is_each_correctors_own_accuracy(digits_test, correctors):
    matrix = transfer_matrix(digits_test, correctors)
    assert list(matrix.index) == ["clean", "bim", "fgsm"] and list(matrix.columns) == ["fgsm", "bim"]
    test = digits_test
    for attack, corrector in correctors.items():
        rows = test.select(attacks=attack)
        assert matrix.at[attack, attack] == pytest.approx(corrector.score(rows.logits, rows.labels))
    clean = test.select(attacks="clean")
    assert matrix.at["clean", "bim"] == pytest.approx(correctors["bim"].score(clean.logits, clean.labels))


def test_p_clean_trades_clean_for_robust_accuracy(digits_train, digits_test):
    sweep = sweep_p_clean(digits_train, digits_test, "fgsm", [0.0, 1.0], progress=False, **FAST)
    assert list(sweep.index) == [0.0, 1.0]
    # Trained on clean logits only, the corrector keeps clean accuracy; trained on attacked only, it
    # recovers more attacked rows.
    assert sweep.at[1.0, "clean_accuracy"] > sweep.at[0.0, "clean_accuracy"]
    assert sweep.at[0.0, "robust_accuracy"] > sweep.at[1.0, "robust_accuracy"]


def test_evaluate_refuses_unknown_attacks_and_unlabelled_rows(digits_test):
    with pytest.raises(LogitguardError, match=r"no rows for attack\(s\) \['pgd'\] in this table; it has \['bim', 'fgsm'\]"):
        evaluate(digits_test, attacks=["pgd"])
    unlabelled = type(digits_test).from_arrays(
        logits=digits_test.logits, sample_id=digits_test.sample_id, split=digits_test.split, attack=digits_test.attack)
    with pytest.raises(LogitguardError, match="evaluation needs ground-truth labels"):
        evaluate(unlabelled)


def test_render_table_plain_and_markdown_modes():
    import pandas as pd

    from logitguard.report.summary import markdown_frame, render_table

    rows = [["pgd", "12.5%"], ["fgsm-e8", "3.0%"]]
    assert render_table(["attack", "acc"], rows) == ["attack     acc", "-------  -----", "pgd      12.5%",
                                                     "fgsm-e8   3.0%"]
    assert render_table(["attack", "acc"], [], left=2) == ["attack  acc", "------  ---"]
    assert render_table(["a", "b"], [[1, "x"]], markdown=True) == ["| a | b |", "|---|---|", "| 1 | x |"]
    frame = pd.DataFrame({"acc": ["1%", "2%"]}, index=pd.Index(["pgd", "cw"], name="attack"))
    assert markdown_frame(frame) == "| attack | acc |\n|---|---|\n| pgd | 1% |\n| cw | 2% |"
    assert markdown_frame(frame, index=False) == "| acc |\n|---|\n| 1% |\n| 2% |"


def test_evaluate_refuses_a_detector_where_labels_are_expected(digits_train, digits_test):
    from logitguard.defenses.detectors import make_detector
    from logitguard.defenses.gated import GatedDefense

    detector = make_detector("msp", fpr=0.05).fit_table(digits_train)
    with pytest.raises(LogitguardError, match="is a detector"):
        evaluate(digits_test, {"msp": detector})
    gated = evaluate(digits_test, {"msp": GatedDefense(detector, None, on_flag="reject")})
    assert set(gated["defense"]) == {"none", "msp"}


def test_evaluate_path_refuses_a_detector_like_evaluate(digits_split_dir):
    from logitguard.defenses.detectors import make_detector
    from logitguard.engines.stream import evaluate_path
    from logitguard.tables import TableSource, read_table

    detector = make_detector("msp", fpr=0.05).fit_table(read_table(digits_split_dir, split="train"))
    with pytest.raises(LogitguardError, match="is a detector"):
        evaluate_path(TableSource(digits_split_dir, split="test"), {"msp": detector})


SEVERAL_SPLITS = r"the table holds splits \['test', 'train'\]; select the rows of one first: table.select\(split='{}'\)"


def test_fits_and_evaluations_refuse_a_table_of_two_splits(digits_split_table, digits_split_dir, digits_test):
    """Fits and evaluations use every row they are given: a forgotten selection is an error that says how to
    select, never a fit on test rows or a figure that mixes splits."""
    from logitguard.defenses.corrector import LogitCorrector
    from logitguard.defenses.detectors import make_detector
    from logitguard.defenses.gated import GatedDefense
    from logitguard.defenses.svm import SVMCorrector
    from logitguard.engines.stream import evaluate_path
    from logitguard.evaluation.threat import threat_model_table
    from logitguard.tables import TableSource

    train = SEVERAL_SPLITS.format("train")
    with pytest.raises(TableError, match="fitting a msp detector: " + train):
        make_detector("msp").fit_table(digits_split_table)
    with pytest.raises(TableError, match="fitting a msp detector: " + train):
        make_detector("msp").fit_path(digits_split_dir)
    with pytest.raises(TableError, match="training the SVM corrector: " + train):
        SVMCorrector().fit_table(digits_split_table, "fgsm")
    for table in (digits_split_table, digits_split_dir):
        with pytest.raises(TableError, match="training a corrector: " + train):
            LogitCorrector(hidden=8, epochs=1, progress=False).fit_table(table, "fgsm")
    detector = make_detector("msp").fit_table(digits_test)  # one split: fine, whichever it is
    test = SEVERAL_SPLITS.format("test")
    with pytest.raises(TableError, match="evaluation: " + test):
        evaluate(digits_split_table)
    with pytest.raises(TableError, match="evaluation: " + test):
        evaluate_path(digits_split_dir)
    with pytest.raises(TableError, match="threat-model evaluation: " + test):
        threat_model_table(digits_split_table, {"msp": GatedDefense(detector, None, on_flag="reject")})
    assert len(evaluate(digits_test)) == len(evaluate_path(TableSource(digits_split_dir, split="test")))
