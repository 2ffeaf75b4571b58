"""Guard: one file for a fitted defense, checked on real digits and on the embedded Fashion-MNIST table."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from logitguard import LogitguardError
from logitguard.cli import main
from logitguard.defenses.decision import ABSTAIN
from logitguard.defenses.detectors import load_detector
from logitguard.defenses.guard import Guard
from logitguard.evaluation.guard import fit_guard, guard_from_pipeline
from logitguard.defenses.pipelines import load_pipelines
from logitguard.tables import read_table
from logitguard.evaluation.threat import threat_model_table

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def guard(digits_split_table):
    return fit_guard(digits_split_table, corrector="svm", on_flag="agree", fpr=0.05, budgets=(0.15,))


@pytest.fixture(scope="module")
def test_rows(digits_split_table):
    return digits_split_table.select(split="test")


def test_a_fitted_guard_checks_arrays_like_its_defense(guard, test_rows):
    assert (guard.num_classes, guard.num_queries, guard.needs_noise) == (10, 3, True)
    decision = guard.check(test_rows.logits, test_rows.noisy_logits)
    expected = guard.defense.check(test_rows.logits, test_rows.noisy_logits)
    for got, want in zip(decision, expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(decision.model_label, test_rows.logits.argmax(1))
    detector = guard.defense.detector
    np.testing.assert_array_equal(decision.flagged, decision.score > detector.threshold_)
    # agree: a flagged row keeps the model's label or abstains; an unflagged row keeps the model's label.
    flagged = decision.flagged
    assert flagged.any() and (~flagged).any()
    assert ((decision.label[flagged] == decision.model_label[flagged]) | (decision.label[flagged] == ABSTAIN)).all()
    np.testing.assert_array_equal(decision.label[~flagged], decision.model_label[~flagged])
    # The detector learned: attacked rows are flagged far more often than clean ones.
    rate = {a: flagged[test_rows.attack == a].mean() for a in ("clean", "fgsm")}
    assert rate["fgsm"] > rate["clean"] + 0.3


def test_the_guard_records_what_it_was_measured_under(guard, digits_split_table):
    info = guard.info()
    assert info["classes"] == [f"digit-{i}" for i in range(10)]
    assert (info["num_classes"], info["num_queries"], info["on_flag"]) == (10, 3, "agree")
    assert info["detector"]["kind"] == "learned-noisy" and info["corrector"]["name"] == "svm"
    assert 0 < info["detector"]["achieved_fpr"] <= 0.05
    models = {(r["pipeline"], r["threat_model"]) for r in info["threat"]}
    assert ("guard", "oblivious") in models and ("none", "oblivious") in models
    assert set(info["unmeasured"]) == {"transfer", "query", "surrogate", "adaptive"}
    # Outside the budgets nothing is measured, and the guard says why.
    narrow = fit_guard(digits_split_table, detector="msp", fpr=0.05, budgets=(0.05,))
    assert narrow.unmeasured["oblivious"] == "no oblivious attack within the budgets (0.05)"
    assert info["provenance"]["logits_sha256"] and info["provenance"]["settings"]["attacks"] == ["bim", "fgsm"]
    json.dumps(info, allow_nan=False)


def test_one_file_round_trip(guard, test_rows, tmp_path):
    path = guard.save(tmp_path / "guard.npz")
    with pytest.raises(LogitguardError, match="refusing to overwrite"):
        guard.save(path)
    loaded = Guard.load(path)
    assert loaded.info() == json.loads(json.dumps(guard.info()))
    for got, want in zip(loaded.check(test_rows.logits, test_rows.noisy_logits),
                         guard.check(test_rows.logits, test_rows.noisy_logits)):
        np.testing.assert_array_equal(got, want)
    frame = loaded.check_table(test_rows)
    assert list(frame.columns) == ["split", "sample_id", "attack", "model_label", "flagged", "score", "label",
                                   "abstained"]
    assert (frame["abstained"] == (frame["label"] == ABSTAIN)).all()


@pytest.mark.parametrize("change, message", [
    (lambda x, n: (x[:, :7], n), "logits have 7 classes; expected 10"),
    (lambda x, n: (x, n[:, :2]), "noisy_logits have 2 noise queries; expected 3"),
    (lambda x, n: (x, None), "noise queries (noisy_logits, shape (N, K, C)) are required"),
    (lambda x, n: (np.where(np.arange(10) == 4, np.inf, x), n), "logits contain NaN or infinite values (first in row 0)"),
    (lambda x, n: (x[:0], n[:0]), "logits must have shape (N, C) with N >= 1"),
])
def test_bad_inputs_get_precise_errors(guard, test_rows, change, message):
    logits, noisy = change(test_rows.logits, test_rows.noisy_logits)
    with pytest.raises(LogitguardError, match=re.escape(message)):
        guard.check(logits, noisy)


def test_a_guard_from_the_shipped_pipeline_carries_its_adaptive_figures():
    """ln-reject's files are the ones the embedded adaptive partitions attacked: the guard's figures are
    threat_model_table's for that pipeline, adaptive tier included."""
    guard = guard_from_pipeline(DATA / "defenses" / "defenses.json", "ln-reject", DATA / "fashion-mnist")
    table = read_table(DATA / "fashion-mnist", split="test")
    expected = threat_model_table(table, {"ln-reject": load_pipelines(DATA / "defenses" / "defenses.json")["ln-reject"].build()})
    got = {(r["threat_model"], r["eps"]): r["robust_accuracy"] for r in guard.threat if r["pipeline"] == "guard"}
    want = {(r.threat_model, r.eps): r.robust_accuracy for r in expected.itertuples() if r.pipeline == "ln-reject"}
    assert set(got) == set(want) and {m for m, _ in got} == {"transfer", "query", "oblivious", "surrogate", "adaptive"}
    assert all(got[k] == pytest.approx(want[k]) for k in got)
    assert guard.unmeasured == {}
    # Decisions on the embedded rows equal the pipeline's own.
    rows = table.select(attacks=["clean", "pgd"])
    np.testing.assert_array_equal(guard.check(rows.logits, rows.noisy_logits).label,
                                  load_pipelines(DATA / "defenses" / "defenses.json")["ln-reject"].build().predict_table(rows))


def test_adaptive_figures_need_the_very_files_that_were_attacked(tmp_path):
    """The same weights re-saved (another file, another sha256) are not what the adaptive attacker had."""
    folder = tmp_path / "defenses"
    shutil.copytree(DATA / "defenses", folder)
    detector = load_detector(folder / "learned-noisy.npz")
    detector.save(folder / "learned-noisy.npz", overwrite=True)  # the current format: new bytes
    guard = guard_from_pipeline(folder / "defenses.json", "ln-reject", DATA / "fashion-mnist")
    models = {r["threat_model"] for r in guard.threat if r["pipeline"] == "guard"}
    assert "adaptive" not in models and "surrogate" in models
    assert re.match(r"the table's \d+ adaptive partitions aimed at 'ln-reject' attacked other files",
                    guard.unmeasured["adaptive"])


def test_guard_commands(digits_split_dir, tmp_path):
    out = tmp_path / "guard.npz"
    runner = CliRunner()
    fit = runner.invoke(main, ["guard", "fit", str(digits_split_dir), "--out", str(out), "--fpr", "0.05", "--json"])
    assert fit.exit_code == 0, fit.output
    assert json.loads(fit.output)["detector"]["kind"] == "learned-noisy"
    again = runner.invoke(main, ["guard", "fit", str(digits_split_dir), "--out", str(out)])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
    info = runner.invoke(main, ["guard", "info", str(out)])
    assert info.exit_code == 0 and "on_flag: reject" in info.output and "not measured: adaptive" in info.output
    applied = runner.invoke(main, ["guard", "apply", str(digits_split_dir), "--guard", str(out), "--split", "test",
                                   "--out", str(tmp_path / "checked"), "--json"])
    assert applied.exit_code == 0, applied.output
    report = json.loads(applied.output)
    checked = read_table(tmp_path / "checked")
    guard = Guard.load(out)
    table = read_table(digits_split_dir, split="test")
    expected = guard.check_table(table)
    np.testing.assert_array_equal(checked.column("flagged"), expected["flagged"].to_numpy())
    assert report["rejected_rate"]["clean"] == pytest.approx(expected.loc[expected.attack == "clean", "abstained"].mean())
    bad = runner.invoke(main, ["guard", "fit", str(digits_split_dir), "--out", str(tmp_path / "g2.npz"),
                               "--from-pipeline", "nocolon"])
    assert bad.exit_code == 1 and "--from-pipeline takes MANIFEST:NAME" in bad.output
    wrong = runner.invoke(main, ["guard", "apply", str(DATA / "fashion-mnist"), "--guard", str(out), "--split", "test",
                                 "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 1 and "Error: the table has 8 noise queries; this guard expects 3" in wrong.output
