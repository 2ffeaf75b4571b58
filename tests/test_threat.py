"""Threat models: vocabulary, per-sample worst case per tier, on_flag policies, manifests and the CLI.

The synthetic tables are small enough that every expected number is worked out by hand in the comments.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from logitguard import LogitguardError, LogitTable, read_table, write_table
from logitguard.cli import main
from logitguard.defenses.gated import GatedDefense
from logitguard.defenses.decision import ABSTAIN
from logitguard.defenses.detectors import Detector, make_detector
from logitguard.evaluation.evaluate import evaluate
from logitguard.defenses.pipelines import PipelineSpec, load_pipelines, refit_detectors, save_pipelines
from logitguard.defenses.svm import SVMCorrector
from logitguard.evaluation.threat import detector_miss_table, threat_model_table
from logitguard.report.threat_text import format_detector_misses, format_threat_models
from logitguard.files import file_sha256
from logitguard.tables.threat import THREAT_MODELS, parse_budgets, subset_partitions, threat_of, tier_attacks

E8, E16 = 8 / 255, 16 / 255
LABELS = np.array([0, 1, 2, 0, 1])  # samples 0..4; sample 4 is not selected (bare model wrong when clean)

# attack: (threat entry or None, linf of every row, the bare model's verdict per sample: R right, W wrong)
ATTACKS = {
    "clean": (None, 0.0, "RRRRW"),
    "pgd": ({"model": "oblivious"}, E16, "WWRRW"),
    "pgd8": ({"model": "oblivious"}, E8, "WRRRW"),
    "fgsm": ({"model": "oblivious"}, E16, "RRWRW"),
    "big": ({"model": "oblivious"}, 0.5, "RWWWW"),  # outside both budgets
    "transfer-pgd": ({"model": "transfer", "attack": "pgd"}, E16, "RRRWW"),
    "surrogate-pgd": ({"model": "surrogate", "target": "gated"}, E16, "RRRWW"),
    "routes": ({"model": "adaptive", "target": "gated"}, E16, "RRRRW"),
    "evade-other": ({"model": "adaptive", "target": "other"}, E8, "WWWWW"),
}
# Fixed verdicts of two pipelines per attack and sample: R right, W wrong, A abstain.
GATED = {
    "clean": "RARRR", "pgd": "ARRRW", "pgd8": "WRRRW", "fgsm": "RRRRW", "big": "WWWWW",
    "transfer-pgd": "RRRAW", "surrogate-pgd": "RRWRW", "routes": "RWRWW", "evade-other": "WWWWW",
}
CORRECTOR = {attack: "RRRRW" for attack in ATTACKS} | {"clean": "RRRWR"}  # wrong on sample 3's clean row only


def _logits(labels: np.ndarray, verdicts: str) -> np.ndarray:
    wrong = np.array([v == "W" for v in verdicts])
    return 5.0 * np.eye(3)[np.where(wrong, (labels + 1) % 3, labels)]


@pytest.fixture(scope="module")
def synthetic() -> LogitTable:
    names = list(ATTACKS)
    return LogitTable.from_arrays(
        logits=np.concatenate([_logits(LABELS, ATTACKS[a][2]) for a in names]),
        sample_id=np.tile(np.arange(5), len(names)), split="test", attack=np.repeat(names, 5),
        label=np.tile(LABELS, len(names)), linf=np.repeat([ATTACKS[a][1] for a in names], 5),
        metadata={"threat": {a: t for a, (t, _, _) in ATTACKS.items() if t is not None}},
    )


class Fixed:
    """A pipeline whose label per (attack, sample) is given by R/W/A codes."""

    def __init__(self, codes: dict[str, str]) -> None:
        self.codes = codes

    def predict_table(self, table: LogitTable) -> np.ndarray:
        code = np.array([self.codes[a][s] for a, s in zip(table.attack, table.sample_id)])
        return np.select([code == "R", code == "W"], [table.labels, (table.labels + 1) % 3], ABSTAIN)


def _by(frame):
    return {(r["pipeline"], r["threat_model"], round(r["eps"] * 255)): r for r in frame.to_dict(orient="records")}


# -- vocabulary -------------------------------------------------------------------------------------


def test_threat_of_defaults_to_oblivious_and_checks_the_model(synthetic):
    assert THREAT_MODELS == ("oblivious", "transfer", "query", "surrogate", "adaptive")
    assert threat_of({}, "pgd") == {"model": "oblivious"}
    assert threat_of(synthetic.metadata, "routes") == {"model": "adaptive", "target": "gated"}
    with pytest.raises(LogitguardError, match=re.escape(
            "metadata 'threat' for attack 'pgd': unknown threat model 'white-box'; expected one of oblivious,")):
        threat_of({"threat": {"pgd": {"model": "white-box"}}}, "pgd")


def test_tiers_are_cumulative_and_only_count_attacks_aimed_at_the_pipeline(synthetic):
    gated = tier_attacks(synthetic.metadata, synthetic.attacks, "gated")
    oblivious = ["big", "fgsm", "pgd", "pgd8"]
    assert gated == {"transfer": ["transfer-pgd"], "oblivious": oblivious,
                     "surrogate": oblivious + ["surrogate-pgd"], "adaptive": oblivious + ["surrogate-pgd", "routes"]}
    # The bare model: every oblivious attack is adaptive; attacks aimed at other pipelines are not its.
    assert tier_attacks(synthetic.metadata, synthetic.attacks, "none") == {
        "transfer": ["transfer-pgd"], "oblivious": oblivious, "surrogate": oblivious, "adaptive": oblivious}
    # A pipeline no surrogate or adaptive attack aimed at has no such tiers: nothing was measured.
    assert list(tier_attacks(synthetic.metadata, synthetic.attacks, "third")) == ["transfer", "oblivious"]


def test_budgets_parse_as_fractions_and_errors_say_what_is_wrong():
    assert parse_budgets("8/255, 16/255,0.1") == (E8, E16, 0.1)
    with pytest.raises(LogitguardError, match=re.escape("budgets must be numbers or fractions such as 8/255, got 'x'")):
        parse_budgets("8/255,x")
    with pytest.raises(LogitguardError, match=re.escape("budgets must be positive, got '0'")):
        parse_budgets("0")


def test_file_sha256_is_the_plain_digest(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"logitguard" * 100_000)
    assert file_sha256(path) == hashlib.sha256(b"logitguard" * 100_000).hexdigest()


# -- the threat-model table -------------------------------------------------------------------------


def test_bare_model_worst_case_by_hand(synthetic):
    frame = threat_model_table(synthetic, {})
    assert list(frame.columns) == [
        "pipeline", "threat_model", "eps", "samples", "draws",
        "clean_accuracy", "clean_accuracy_low", "clean_accuracy_high", "coverage", "coverage_low", "coverage_high",
        "robust_accuracy", "robust_accuracy_low", "robust_accuracy_high", "robust_single_draw",
        "harm", "harm_low", "harm_high", "no_harm", "attacks", "judge_gaps"]
    rows = _by(frame)
    # Selected samples 0-3. At 8/255 only pgd8 is in budget (pgd, fgsm are 16/255; big is 0.5): breaks 0.
    assert rows[("none", "oblivious", 8)]["robust_accuracy"] == 0.75
    assert rows[("none", "oblivious", 8)]["attacks"] == ["pgd8"]
    # At 16/255: pgd breaks 0 and 1, fgsm breaks 2; each attack alone leaves 50% / 75%, together 25%.
    # 'big' breaks 1, 2 and 3 but is outside the budget; sample 4's rows never count.
    assert rows[("none", "oblivious", 16)]["robust_accuracy"] == 0.25
    assert rows[("none", "oblivious", 16)]["attacks"] == ["fgsm", "pgd", "pgd8"]
    assert rows[("none", "adaptive", 16)]["robust_accuracy"] == 0.25  # surrogate-pgd aims at 'gated', not here
    assert rows[("none", "transfer", 16)]["robust_accuracy"] == 0.75
    assert ("none", "transfer", 8) not in rows  # no transfer row within 8/255: no figure, not 100%
    assert {r["samples"] for r in rows.values()} == {4}
    assert {r["clean_accuracy"] for r in rows.values()} == {1.0}
    assert {key: r["harm"] for key, r in rows.items() if key[1] != "transfer"} == dict.fromkeys(
        [(m, t, e) for m in ["none"] for t in ("oblivious", "surrogate", "adaptive") for e in (8, 16)], 0.0)
    assert rows[("none", "transfer", 16)]["harm"] == 0.5  # 75% under transfer vs 25% adaptive


def test_defended_worst_case_abstention_and_harm_by_hand(synthetic):
    rows = _by(threat_model_table(synthetic, {"gated": Fixed(GATED), "corrector": Fixed(CORRECTOR)}))
    g = {key[1:]: row for key, row in rows.items() if key[0] == "gated"}
    # Clean rows: 0 right, 1 rejected (an error for clean accuracy, not for robustness), 2 and 3 right.
    assert g[("oblivious", 8)]["clean_accuracy"] == 0.75 and g[("oblivious", 8)]["coverage"] == 0.75
    # transfer-pgd: only sample 3 attacked successfully, and rejected: defended.
    assert g[("transfer", 16)]["robust_accuracy"] == 1.0
    # 8/255: pgd8 breaks sample 0. 16/255 adds pgd (0 rejected: defended) and fgsm (all right).
    assert g[("oblivious", 8)]["robust_accuracy"] == 0.75
    assert g[("oblivious", 16)]["robust_accuracy"] == 0.75
    # Surrogate adds surrogate-pgd (16/255) breaking sample 2; at 8/255 it has no row in budget: no figure.
    assert g[("surrogate", 16)]["robust_accuracy"] == 0.5
    assert g[("surrogate", 16)]["attacks"] == ["fgsm", "pgd", "pgd8", "surrogate-pgd"]
    assert ("surrogate", 8) not in g and ("adaptive", 8) not in g  # evade-other aims at another pipeline
    # Adaptive adds routes breaking 1 and 3: {0, 1, 2, 3} all broken.
    assert g[("adaptive", 16)]["robust_accuracy"] == 0.0
    assert g[("adaptive", 16)]["harm"] == pytest.approx(0.0 - 0.25)
    assert g[("transfer", 16)]["harm"] == pytest.approx(1.0 - 0.25)
    assert g[("oblivious", 8)]["harm"] == pytest.approx(0.75 - 0.75)
    # The corrector is right on every attacked row but wrong on sample 3's clean row: the unperturbed
    # input is in every budget, so sample 3 is not robust anywhere.
    c = {key[1:]: row for key, row in rows.items() if key[0] == "corrector"}
    assert set(c) == {("transfer", 16), ("oblivious", 8), ("oblivious", 16)}
    assert {row["robust_accuracy"] for row in c.values()} == {0.75}
    assert c[("oblivious", 8)]["clean_accuracy"] == 0.75 and c[("oblivious", 8)]["coverage"] == 1.0


def test_rows_without_linf_use_the_metadata_eps(synthetic):
    # a: eps 8/255 in 'threat'; b: eps 16/255 in 'attacks'; c: unbounded, no eps anywhere (in every budget).
    labels = np.array([0, 1, 2, 0])
    verdicts = {"clean": "RRRR", "a": "WRRR", "b": "RWRR", "c": "RRWR"}
    table = LogitTable.from_arrays(
        logits=np.concatenate([_logits(labels, v) for v in verdicts.values()]),
        sample_id=np.tile(np.arange(4), 4), split="test", attack=np.repeat(list(verdicts), 4),
        label=np.tile(labels, 4),
        metadata={"threat": {"a": {"model": "oblivious", "eps": E8}}, "attacks": {"b": {"eps": E16}, "c": {}}})
    rows = _by(threat_model_table(table, {}, budgets=(E8, E16)))
    assert rows[("none", "oblivious", 8)]["attacks"] == ["a", "c"]
    assert rows[("none", "oblivious", 8)]["robust_accuracy"] == 0.5
    assert rows[("none", "oblivious", 16)]["robust_accuracy"] == 0.25


def test_detector_miss_table_by_hand(synthetic):
    scores = {("pgd", 0): 0.95, ("pgd", 1): 0.5, ("pgd8", 0): 0.99, ("fgsm", 2): 0.9, ("transfer-pgd", 3): 0.97,
              ("surrogate-pgd", 3): 0.0, ("big", 1): 0.99}

    class Lookup(Detector):
        def score_table(self, table):
            return np.array([scores.get((a, s), 0.0) for a, s in zip(table.attack, table.sample_id)])

    detector = Lookup(fpr=0.1).calibrate(np.arange(100) / 100)  # thresholds: own 0.89, 5% 0.94, 1% 0.98
    detector.kind = "lookup"
    rows = {(r["threat_model"], round(r["eps"] * 255)): r
            for r in detector_miss_table(synthetic, {"gated": detector}).to_dict(orient="records")}
    # Successful oblivious attacks within 16/255: pgd on 0 and 1, pgd8 on 0, fgsm on 2 (scores .95 .5 .99 .9).
    ob = rows[("oblivious", 16)]
    assert (ob["successful"], ob["fpr"]) == (4, 0.1)
    assert (ob["missed"], ob["missed_at_1"], ob["missed_at_5"]) == (0.25, 0.75, 0.5)
    assert rows[("oblivious", 8)]["successful"] == 1 and rows[("oblivious", 8)]["missed_at_1"] == 0.0
    # Adaptive adds surrogate-pgd on 3 (score 0, missed everywhere); routes never fools the bare model.
    ad = rows[("adaptive", 16)]
    assert ad["successful"] == 5 and (ad["missed"], ad["missed_at_1"], ad["missed_at_5"]) == (0.4, 0.8, 0.6)
    tr = rows[("transfer", 16)]
    assert (tr["successful"], tr["missed"], tr["missed_at_1"], tr["missed_at_5"]) == (1, 0.0, 1.0, 0.0)
    text = format_detector_misses(detector_miss_table(synthetic, {"gated": detector}))
    assert re.search(r"gated\s+lookup\s+adaptive\s+16/255\s+5\s+40.0% @10%\s+80.0%\s+60.0%", text), text


def test_format_threat_models_is_one_line_per_pipeline_and_budget(synthetic):
    text = format_threat_models(threat_model_table(synthetic, {"gated": Fixed(GATED)}))
    lines = text.splitlines()
    assert re.split(r"\s{2,}", lines[1]) == ["pipeline", "eps", "samples", "draws", "clean", "coverage", "transfer",
                                            "oblivious", "surrogate", "adaptive", "harm (points)", "no harm"]
    # Every figure with its exact 95% interval: 3/4 -> [19.4, 99.4], 4/4 -> [39.8, 100.0], 2/4 -> [6.8, 93.2],
    # 0/4 -> [0.0, 60.2]; harm -25 points with its paired-bootstrap interval, which does not clear 0.
    gated16 = next(line for line in lines if line.startswith("gated") and "16/255" in line)
    assert re.split(r"\s{2,}", gated16) == [
        "gated", "16/255", "4", "1", "75.0% [19.4, 99.4]", "75.0% [19.4, 99.4]", "100.0% [39.8, 100.0]",
        "75.0% [19.4, 99.4]", "50.0% [6.8, 93.2]", "0.0% [0.0, 60.2]", "-25.0 [-75.0, +0.0]", "not established"]
    gated8 = next(line for line in lines if line.startswith("gated") and "8/255" in line)
    assert re.split(r"\s{2,}", gated8) == ["gated", "8/255", "4", "1", "75.0% [19.4, 99.4]", "75.0% [19.4, 99.4]", "-",
                                          "75.0% [19.4, 99.4]", "-", "-", "-", "-"]


def test_threat_evaluation_needs_labels_and_clean_rows(synthetic):
    with pytest.raises(LogitguardError, match=re.escape("threat-model evaluation needs clean rows")):
        threat_model_table(synthetic.select(attacks=["pgd"]), {})
    unlabelled = LogitTable.from_arrays(logits=synthetic.logits, sample_id=synthetic.sample_id,
                                        split=synthetic.split, attack=synthetic.attack)
    with pytest.raises(LogitguardError, match=re.escape("threat-model evaluation needs ground-truth labels")):
        threat_model_table(unlabelled, {})


# -- on_flag policies on real digits logits -----------------------------------------------------------


@pytest.fixture(scope="module")
def digits_defense(digits_train):
    return make_detector("msp").fit_table(digits_train), SVMCorrector().fit_table(digits_train, "fgsm")


def test_policies_correct_reject_and_agree(digits_split_table, digits_defense):
    detector, svm = digits_defense
    test = digits_split_table.select(split="test")
    argmax, y = test.logits.argmax(1), test.labels
    flags, corrected = detector.flag_table(test), svm.predict(test.logits)
    assert 0 < flags.mean() < 1
    labels = {p: _label_and_flags(GatedDefense(detector, svm, on_flag=p).check_table(test))
              for p in ("correct", "reject", "agree")}
    for policy, (pred, flagged) in labels.items():
        np.testing.assert_array_equal(flagged, flags)
        np.testing.assert_array_equal(pred[~flags], argmax[~flags])
    np.testing.assert_array_equal(labels["correct"][0][flags], corrected[flags])
    assert (labels["reject"][0][flags] == ABSTAIN).all()
    agree = labels["agree"][0]
    np.testing.assert_array_equal(agree[flags], np.where(corrected == argmax, argmax, ABSTAIN)[flags])
    # reject and agree never emit a label the model did not give: a right answer cannot become wrong.
    for policy in ("reject", "agree"):
        pred = labels[policy][0]
        assert ((pred == argmax) | (pred == ABSTAIN)).all()
    # "correct" does turn some right answers wrong on these rows (the harm the policies avoid).
    assert ((argmax == y) & (labels["correct"][0] != y)).any()
    # No detector: every row is flagged (a corrector alone); neither: the bare model.
    pred, flagged = _label_and_flags(GatedDefense(None, svm).check_table(test))
    assert flagged.all() and (pred == corrected).all()
    pred, flagged = _label_and_flags(GatedDefense(None, None).check_table(test))
    assert not flagged.any() and (pred == argmax).all()
    pred = GatedDefense(detector, None, on_flag="reject").predict_table(test)
    np.testing.assert_array_equal(pred, labels["reject"][0])


def test_policy_errors_are_clear(digits_defense):
    detector, svm = digits_defense
    with pytest.raises(LogitguardError, match=re.escape("unknown on_flag policy 'drop'; choose from correct, reject, agree")):
        GatedDefense(detector, svm, on_flag="drop")
    with pytest.raises(LogitguardError, match=re.escape("on_flag='correct' needs a corrector; with a detector alone use")):
        GatedDefense(detector, None)
    with pytest.raises(LogitguardError, match=re.escape("on_flag='reject' without a detector would reject every row")):
        GatedDefense(None, svm, on_flag="reject")


def test_evaluate_counts_rejections_as_the_docs_say(digits_test, digits_split_table, digits_defense):
    detector, _ = digits_defense
    reject = GatedDefense(detector, None, on_flag="reject")
    results = evaluate(digits_test, {"reject": reject}, attacks=["fgsm"])
    row = results.set_index(["subset", "defense"]).loc[("full", "reject")]
    test = digits_split_table.select(split="test")
    clean, attacked = test.select(attacks="clean"), test.select(attacks="fgsm")
    flag_clean, flag_attacked = detector.flag_table(clean), detector.flag_table(attacked)
    right_clean = clean.logits.argmax(1) == clean.labels
    right_attacked = attacked.logits.argmax(1) == attacked.labels
    assert row["clean_accuracy"] == pytest.approx((right_clean & ~flag_clean).mean())  # rejected clean: error
    assert row["coverage"] == pytest.approx(1 - flag_clean.mean())
    assert row["robust_accuracy"] == pytest.approx((right_attacked | flag_attacked).mean())  # rejected: defended
    none = results.set_index(["subset", "defense"]).loc[("full", "none")]
    assert none["coverage"] == 1.0


def test_defend_table_stores_rejections_as_null_pred(digits_split_table, digits_defense, tmp_path):
    detector, svm = digits_defense
    test = digits_split_table.select(split="test")
    defense = GatedDefense(detector, svm, on_flag="agree")
    pred, flagged = _label_and_flags(defense.check_table(test))
    assert (pred == ABSTAIN).any()
    defended = defense.defend_table(test)
    assert defended.arrow.column("pred").null_count == int((pred == ABSTAIN).sum())
    write_table(defended, tmp_path / "d.parquet")
    back = read_table(tmp_path / "d.parquet")
    np.testing.assert_array_equal(back.column("pred"), pred)
    np.testing.assert_array_equal(back.column("flagged"), flagged)
    assert back.metadata["defended_by"]["on_flag"] == "agree"
    assert back.metadata["defended_by"]["detector"]["kind"] == "msp"


# -- manifests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def defense_files(digits_defense, tmp_path_factory):
    detector, svm = digits_defense
    folder = tmp_path_factory.mktemp("defenses")
    return folder, detector.save(folder / "msp.npz"), svm.save(folder / "svm.npz")


def test_manifest_round_trip(defense_files, digits_split_table, tmp_path, monkeypatch):
    folder, msp, svm = defense_files
    monkeypatch.chdir(folder.parent)  # paths relative to the current directory are stored relative to the manifest
    manifest = save_pipelines(folder / "defenses.json", {
        "none": {}, "svm": {"corrector": f"{folder.name}/svm.npz"},
        "msp-svm": {"detector": msp, "corrector": svm, "on_flag": "agree"},
        "msp-reject": {"detector": msp, "on_flag": "reject"}})
    doc = json.loads(manifest.read_text())
    assert doc == {"format": "logitguard.Pipelines", "format_version": 1, "pipelines": {
        "none": {}, "svm": {"corrector": "svm.npz", "on_flag": "correct"},
        "msp-svm": {"detector": "msp.npz", "corrector": "svm.npz", "on_flag": "agree"},
        "msp-reject": {"detector": "msp.npz", "on_flag": "reject"}}}
    specs = load_pipelines(manifest)
    assert list(specs) == ["none", "svm", "msp-svm", "msp-reject"]
    assert specs["msp-svm"] == PipelineSpec("msp-svm", msp.resolve(), svm.resolve(), "agree")
    assert specs["none"].files() == {} and specs["msp-svm"].files() == {"msp.npz": msp.resolve(),
                                                                       "svm.npz": svm.resolve()}
    assert specs["msp-svm"].fingerprints() == {
        name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in (("msp.npz", msp), ("svm.npz", svm))}
    test = digits_split_table.select(split="test")
    built = specs["msp-svm"].build()
    assert built.on_flag == "agree"
    np.testing.assert_array_equal(built.predict_table(test),
                                  GatedDefense(*[load(p) for load, p in _loaders(msp, svm)],
                                               on_flag="agree").predict_table(test))
    np.testing.assert_array_equal(specs["none"].build().predict_table(test), test.logits.argmax(1))
    with pytest.raises(LogitguardError, match="refusing to overwrite existing file"):
        save_pipelines(manifest, {"none": {}})
    save_pipelines(manifest, {"none": {}}, overwrite=True)
    assert list(load_pipelines(manifest)) == ["none"]


def _loaders(msp, svm):
    from logitguard.defenses.gated import load_corrector
    from logitguard.defenses.detectors import load_detector

    return [(load_detector, msp), (load_corrector, svm)]


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON (Expecting property name enclosed in double quotes"),
    ('{"format": "other"}', 'not a logitguard pipeline manifest (expected "format": "logitguard.Pipelines")'),
    ('{"format": "logitguard.Pipelines", "format_version": 2, "pipelines": {}}',
     "written by a newer logitguard (format_version 2, this one reads 1); upgrade logitguard"),
    ('{"format": "logitguard.Pipelines", "format_version": 1, "pipelines": {"x": {"detector": "msp.npz", '
     '"on_flag": "drop"}}}', "pipeline 'x': unknown on_flag 'drop'; choose from correct, reject, agree"),
    ('{"format": "logitguard.Pipelines", "format_version": 1, "pipelines": {"x": {"detector": "gone.npz"}}}',
     "pipeline 'x': no such detector file: "),
    ('{"format": "logitguard.Pipelines", "format_version": 1, "pipelines": {"x": {"detector": "msp.npz"}}}',
     "pipeline 'x': on_flag='correct' needs a corrector"),
    ('{"format": "logitguard.Pipelines", "format_version": 1, "pipelines": {"x": {"detecter": "msp.npz"}}}',
     "pipeline 'x' has unknown key(s) ['detecter']; allowed: detector, corrector, on_flag"),
])
def test_manifest_errors(defense_files, content, message):
    folder, _, _ = defense_files
    path = folder / "bad.json"
    path.write_text(content)
    with pytest.raises(LogitguardError, match="^" + re.escape(f"{path}: {message}")):
        load_pipelines(path)


def test_manifest_missing_and_save_errors(tmp_path):
    with pytest.raises(LogitguardError, match=f"^no such pipeline manifest: {re.escape(str(tmp_path / 'x.json'))}$"):
        load_pipelines(tmp_path / "x.json")
    with pytest.raises(LogitguardError, match=re.escape("pipeline 'p': unknown on_flag policy 'drop'")):
        save_pipelines(tmp_path / "x.json", {"p": {"detector": "a.npz", "on_flag": "drop"}})
    assert not (tmp_path / "x.json").exists()


def test_refit_detectors_keeps_each_detectors_kind_and_parameters(defense_files, digits_train, tmp_path):
    """A refit learns each detector afresh, of the same kind and parameters, from the attacks it is given (here
    a learned-ranked detector first fitted on FGSM, refitted on FGSM and BIM), copies corrector-only files
    unchanged, and writes a manifest of the same pipelines; it refuses to overwrite and to merge two files of
    one name."""
    folder, _, svm = defense_files
    first = make_detector("learned-ranked", fpr=0.05, hidden=16, seed=3).fit_table(digits_train, attacks=["fgsm"])
    start = save_pipelines(tmp_path / "start" / "defenses.json", {
        "ranked-svm": {"detector": first.save(tmp_path / "start" / "ranked.npz"), "corrector": svm,
                       "on_flag": "agree"},
        "ranked-reject": {"detector": tmp_path / "start" / "ranked.npz", "on_flag": "reject"}, "none": {}})
    specs = load_pipelines(start)
    manifest = refit_detectors(specs, digits_train, tmp_path / "round", attacks=["fgsm", "bim"])
    assert manifest == tmp_path / "round" / "defenses.json"
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["defenses.json", "ranked.npz", "svm.npz"]
    refit = load_pipelines(manifest)
    assert list(refit) == list(specs) and refit["ranked-svm"].on_flag == "agree"
    assert (manifest.parent / "svm.npz").read_bytes() == svm.read_bytes()
    detector = refit["ranked-reject"].build().detector
    assert detector.kind == "learned-ranked" and detector.get_params() == first.get_params()
    again = make_detector("learned-ranked", fpr=0.05, hidden=16, seed=3).fit_table(digits_train,
                                                                                  attacks=["fgsm", "bim"])
    np.testing.assert_allclose(detector.score_table(digits_train), again.score_table(digits_train), rtol=1e-9)
    assert not np.allclose(detector.score_table(digits_train), first.score_table(digits_train))
    with pytest.raises(LogitguardError, match="refusing to overwrite existing file"):
        refit_detectors(specs, digits_train, tmp_path / "round", attacks=["fgsm"])
    other = tmp_path / "other"
    other.mkdir()
    clash = {"a": PipelineSpec("a", detector=tmp_path / "start" / "ranked.npz", on_flag="reject"),
             "b": PipelineSpec("b", detector=first.save(other / "ranked.npz"), on_flag="reject")}
    with pytest.raises(LogitguardError, match="two different files are named 'ranked.npz'"):
        refit_detectors(clash, digits_train, tmp_path / "clash", attacks=["fgsm"])
    assert not (tmp_path / "clash").exists()


# -- CLI and imports ------------------------------------------------------------------------------


def test_threat_cli_matches_the_library(digits_split_dir, defense_files, digits_split_table):
    folder, msp, svm = defense_files
    manifest = save_pipelines(folder / "cli.json", {
        "none": {}, "msp-svm": {"detector": msp, "corrector": svm}, "msp-reject": {"detector": msp, "on_flag": "reject"}},
        overwrite=True)
    runner = CliRunner()
    args = ["threat", str(digits_split_dir), "--defenses", str(manifest), "--budgets", "0.1,0.15"]
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    pipelines = {name: spec.build() for name, spec in load_pipelines(manifest).items()}
    expected = threat_model_table(digits_split_table.select(split="test"), pipelines, budgets=(0.1, 0.15))
    got = {(r["pipeline"], r["threat_model"], r["eps"]): r["robust_accuracy"] for r in report["threat_models"]}
    assert got == pytest.approx({(r.pipeline, r.threat_model, r.eps): r.robust_accuracy for r in expected.itertuples()})
    # The digits attacks are FGSM and BIM at 0.15: nothing within 0.1, so only 0.15 rows; all oblivious.
    assert {(r["threat_model"], r["eps"]) for r in report["threat_models"]} == {
        ("oblivious", 0.15), ("surrogate", 0.15), ("adaptive", 0.15)}
    assert {r["pipeline"] for r in report["threat_models"] if r["threat_model"] == "adaptive"} == {"none"}
    assert {r["detector"] for r in report["detector_misses"]} == {"msp-svm", "msp-reject"}
    # Every figure carries its interval; the checks come along (no compare-models file here: no reference).
    assert all(r["robust_accuracy_low"] <= r["robust_accuracy"] <= r["robust_accuracy_high"]
               for r in report["threat_models"])
    assert {r["verdict"] for r in report["tramer"]} <= {"no reference"}
    assert {r["pipeline"] for r in report["indicators"]} == {"none"}
    text = runner.invoke(main, args)
    assert text.exit_code == 0 and "Robust accuracy per threat model" in text.output
    assert "Successful attacks the detector does not flag" in text.output
    assert "Tramèr's ε/2 check" in text.output and "Attack-failure indicators" in text.output


def test_threat_cli_errors_are_exact(digits_split_dir, defense_files, tmp_path):
    folder, _, _ = defense_files
    runner = CliRunner()
    missing = tmp_path / "none.json"
    result = runner.invoke(main, ["threat", str(digits_split_dir), "--defenses", str(missing)])
    assert result.exit_code == 1 and result.output == f"Error: no such pipeline manifest: {missing}\n"
    manifest = save_pipelines(tmp_path / "d.json", {"none": {}})
    result = runner.invoke(main, ["threat", str(digits_split_dir), "--defenses", str(manifest), "--budgets", "8/0"])
    assert result.output == "Error: budgets must be numbers or fractions such as 8/255, got '8/0'\n"


def test_defend_cli_can_reject(digits_split_dir, defense_files, tmp_path):
    _, msp, _ = defense_files
    out = tmp_path / "rejected"
    result = CliRunner().invoke(main, ["defend", str(digits_split_dir), "--detector", str(msp), "--on-flag", "reject",
                                       "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["on_flag"] == "reject" and report["rejected_rate"] == report["flagged_rate"]
    back = read_table(out)
    np.testing.assert_array_equal(back.column("pred") == ABSTAIN, back.column("flagged"))
    rows = {(r["attack"], r["subset"], r["defense"]): r for r in report["evaluation"]}
    assert rows[("fgsm", "full", "gated")]["coverage"] == pytest.approx(1 - report["flagged_rate"]["clean"], abs=0.05)
    result = CliRunner().invoke(main, ["defend", str(digits_split_dir), "--detector", str(msp), "--out", str(tmp_path / "x")])
    assert result.output.startswith("Error: on_flag='correct' needs a corrector")


def test_inspect_shows_threat_models(synthetic, tmp_path):
    path = tmp_path / "t.parquet"
    meta = {**synthetic.metadata, "threat": {**synthetic.metadata["threat"],
            "routes": {"model": "adaptive", "target": "gated", "defense_files": {"msp.npz": "ab" * 32}}}}
    write_table(LogitTable(synthetic.arrow, meta), path)
    summary = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    threat = {c["attack"]: c["threat"] for c in summary["conditions"]}
    assert threat == {"clean": None, "big": "oblivious", "evade-other": "adaptive", "fgsm": "oblivious",
                      "pgd": "oblivious", "pgd8": "oblivious", "routes": "adaptive", "surrogate-pgd": "surrogate",
                      "transfer-pgd": "transfer"}
    assert summary["metadata"]["threat"]["routes"]["target"] == "gated"
    text = CliRunner().invoke(main, ["inspect", str(path)]).output
    assert re.search(r"^test\s+routes\s+adaptive\s+5\s", text, re.M)
    assert "threat routes: model=adaptive, defense_files=[msp.npz@abababababab], target=gated" in text


def test_new_core_modules_import_without_torch():
    code = ("import sys, logitguard.evaluation.threat, logitguard.defenses.pipelines, logitguard.defenses.gated,"
            " logitguard.evaluation.checks, logitguard.evaluation.intervals;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'producers', 'torchvision'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_tier_is_measured_on_the_samples_every_partition_covers(synthetic):
    """An attack run on fewer samples (adaptive ones are costly) sets the sample set for every tier:
    without sample 0's `routes` row, the figures are over samples 1–3 (sample 4 is not selected)."""
    keep = ~((synthetic.attack == "routes") & (synthetic.sample_id == 0))
    results = _by(threat_model_table(synthetic.take(keep), {"gated": Fixed(GATED)}, budgets=(E16,)))
    full = _by(threat_model_table(synthetic, {"gated": Fixed(GATED)}, budgets=(E16,)))
    assert full[("none", "oblivious", 16)]["samples"] == 4
    assert results[("none", "oblivious", 16)]["samples"] == 3
    # the bare model at 16/255 on samples 1-3: pgd breaks 1, fgsm breaks 2, only 3 stays robust
    assert results[("none", "oblivious", 16)]["robust_accuracy"] == pytest.approx(1 / 3)


def _label_and_flags(decision):
    """(defended labels, flags) of a `Decision`."""
    return decision.label, decision.flagged


# -- judge draws, intervals, the no-harm rule and the reviewer's checks ------------------------------

PARENT = "adaptive.gated.suite.e16"
SUITE = {"model": "adaptive", "target": "gated", "attack": "suite", "eps": E16, "sequence": ["apgd-ce", "orthogonal"],
         "indicators": [{"ran": 4, "claimed": 2, "judge_rejected": 1, "stalled": 0},
                        {"ran": 2, "claimed": 0, "judge_rejected": 0, "stalled": 2}]}
# attack: (threat entry, samples present, gated verdicts per sample 0..3, linf per sample). All 4 samples are
# selected (the bare model is right on every row here except pgd's sample 1).
JUDGED = {
    "clean": (None, [0, 1, 2, 3], "RRRR", 0.0),
    "pgd": ({"model": "oblivious", "eps": E16}, [0, 1, 2, 3], "RRRR", E16),
    "transfer-pgd": ({"model": "transfer", "eps": E16}, [0, 1, 2, 3], "RRWR", E16),
    PARENT: ({**SUITE, "judge_draws": 3}, [0, 1, 2, 3], "WRRR", E16),  # draw 0 breaks sample 0
    # Draw 1 holds the samples draw 0 left and breaks sample 1 with half the budget.
    PARENT + ".r1": ({**SUITE, "judge_draw": 1, "judge_of": PARENT}, [1, 2, 3], "RWRR", E16 / 2),
    # Draw 2 should hold samples 2 and 3 but lacks sample 2: a gap the core reports.
    PARENT + ".r2": ({**SUITE, "judge_draw": 2, "judge_of": PARENT}, [3], "RRRR", E16),
}


def _spec_table(spec: dict) -> LogitTable:
    """The table of `spec` (attack: (threat entry, samples present, gated verdicts, linf), as `JUDGED`): labels
    0, 1, 2, 0 for samples 0..3, the bare model right on every row but pgd's sample 1."""
    labels = np.array([0, 1, 2, 0])
    parts = [(a, np.array(s)) for a, (_, s, _, _) in spec.items()]
    bare = {a: "RRRR" for a in spec} | {"pgd": "RWRR"}
    return LogitTable.from_arrays(
        logits=np.concatenate([_logits(labels[s], "".join(bare[a][i] for i in s)) for a, s in parts]),
        sample_id=np.concatenate([s for _, s in parts]), split="test",
        attack=np.concatenate([[a] * len(s) for a, s in parts]), label=np.concatenate([labels[s] for _, s in parts]),
        linf=np.concatenate([np.full(len(s), spec[a][3]) for a, s in parts]),
        metadata={"threat": {a: t for a, (t, _, _, _) in spec.items() if t is not None}})


def _gated(spec: dict) -> Fixed:
    return Fixed({a: v for a, (_, _, v, _) in spec.items()})


@pytest.fixture(scope="module")
def judged() -> LogitTable:
    return _spec_table(JUDGED)


def _gated_judged() -> Fixed:
    return _gated(JUDGED)


def test_judge_draws_make_a_sample_robust_only_on_every_draw(judged):
    frame = threat_model_table(judged, {"gated": _gated_judged()}, budgets=(E16,))
    rows = _by(frame)
    g = rows[("gated", "adaptive", 16)]
    # Draw partitions hold fewer samples but do not shrink the sample set.
    assert g["samples"] == 4 and g["draws"] == 3
    # Broken: 0 (draw 0), 1 (draw 1); 2 and 3 hold (2 is missing from draw 2: counted as a gap, not as broken).
    assert g["robust_accuracy"] == 0.5 and g["robust_single_draw"] == 0.75
    assert g["judge_gaps"] == 1
    assert g["attacks"] == sorted([PARENT, PARENT + ".r1", PARENT + ".r2", "pgd"])
    # Tiers without draws say 1 and have no gaps.
    assert rows[("gated", "oblivious", 16)]["draws"] == 1 and rows[("gated", "oblivious", 16)]["judge_gaps"] == 0
    assert "warning: samples missing from judge draws that no earlier draw broke: gated adaptive 16/255: 1" in \
        format_threat_models(frame)


def test_intervals_and_the_no_harm_verdict(judged):
    frame = threat_model_table(judged, {"gated": _gated_judged()}, budgets=(E16,))
    rows = _by(frame)
    g = rows[("gated", "adaptive", 16)]
    # 2 of 4: Clopper-Pearson [0.068, 0.932].
    assert (g["robust_accuracy_low"], g["robust_accuracy_high"]) == (pytest.approx(0.0676, abs=1e-4),
                                                                      pytest.approx(0.9324, abs=1e-4))
    assert g["clean_accuracy_low"] == pytest.approx(0.3976, abs=1e-4) and g["clean_accuracy_high"] == 1.0
    # Bare model adaptive: pgd breaks sample 1, 3/4. Gated adaptive 2/4: harm -0.25, interval below 0 at the low end.
    assert g["harm"] == pytest.approx(-0.25) and g["harm_low"] < 0 <= g["harm_high"]
    assert g["no_harm"] == "not established"
    # Gated oblivious holds every sample where the bare model loses sample 1: per-sample gains only, so
    # every resample's difference is >= 0 and "does no harm" is established.
    o = rows[("gated", "oblivious", 16)]
    assert o["harm"] == pytest.approx(0.25) and o["harm_low"] >= 0 and o["no_harm"] == "established"
    # The verdict follows harm_low everywhere.
    assert ((frame["no_harm"] == "established") == (frame["harm_low"] >= 0)).all()


def test_tramer_check_flags_an_implied_figure_above_the_best_classifier(judged, tmp_path):
    import pandas as pd

    from logitguard.evaluation.checks import load_reference, tramer_check
    from logitguard.report.threat_text import format_tramer

    frame = threat_model_table(judged, {"gated": _gated_judged()}, budgets=(E16,))
    reference = pd.DataFrame({"model": ["at", "at"], "eps": [E8, E16], "robust_selected": [0.4, 0.3],
                              "robust_accuracy": [0.3, 0.2]})
    check = tramer_check(frame, reference, gated=["gated"])
    # gated's adaptive 50% at 16/255 implies 50% at 8/255, above the best 40% measured there (selected basis).
    row = check.iloc[0]
    assert (row["pipeline"], row["half_eps"], row["reference"], row["verdict"]) == ("gated", E8, 0.4, "exceeds")
    # On the all-samples basis: 50% x 0.5 base accuracy = 25%, below 30% but its interval reaches above.
    row = tramer_check(frame, reference, gated=["gated"], base_accuracy=0.5).iloc[0]
    assert row["implied"] == pytest.approx(0.25) and row["verdict"] == "within interval"
    # Measured only at a larger budget: a lower bound on the best known at ε/2, which still decides the check.
    larger = tramer_check(frame, reference[reference.eps == E16], gated=["gated"]).iloc[0]
    assert (larger["reference"], larger["reference_eps"], larger["verdict"]) == (0.3, E16, "exceeds")
    assert tramer_check(frame, reference[reference.eps == E16 / 4], gated=["gated"]).iloc[0]["verdict"] == \
        "no reference"
    assert tramer_check(frame, None, gated=["gated"]).iloc[0]["verdict"] == "no reference"
    assert "no reference at 8/255" in format_tramer(tramer_check(frame, None, gated=["gated"]))
    assert tramer_check(frame, reference, gated=[]).empty
    # The reference file: a compare-models JSON; missing -> None.
    assert load_reference(None) is None and load_reference(tmp_path / "missing.json") is None
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps({
        "models": [{"model": "at", "clean_accuracy": 0.8}],
        "threat": [{"model": "at", "pipeline": "none", "threat_model": "adaptive", "eps": E8, "samples": 10,
                    "robust_accuracy": 0.5},
                   {"model": "at", "pipeline": "ln-reject", "threat_model": "adaptive", "eps": E8, "samples": 10,
                    "robust_accuracy": 0.9}]}))
    loaded = load_reference(path)
    assert len(loaded) == 1 and loaded.iloc[0]["robust_accuracy"] == pytest.approx(0.4)


def test_attack_failure_indicators(judged):
    from logitguard.evaluation.checks import attack_failure_indicators
    from logitguard.report.threat_text import format_indicators

    frame = attack_failure_indicators(judged, {"gated": _gated_judged()}, budgets=(E16,))
    g = frame[frame["pipeline"] == "gated"].iloc[0]
    # The transfer attack broke sample 2, which no adaptive attack did; oblivious pgd broke nothing.
    assert g["weaker_transfer"] == 1 and g["weaker_oblivious"] == 0
    # Successful adaptive rows: sample 0 at the full budget, sample 1 at half of it.
    assert g["successes"] == 2 and g["linf_ratio_median"] == pytest.approx(0.75)
    # The producer's indicators, once per partition (the draws copy their parent's entry).
    assert (g["ran"], g["claimed"], g["judge_rejected"], g["stalled"]) == (6, 2, 1, 2)
    assert [d["attack"] for d in g["producer"]] == ["apgd-ce", "orthogonal"]
    text = format_indicators(frame)
    assert "warning: gated 16/255: 1 samples broken by the transfer tier that the adaptive attacks missed" in text
    assert "warning: gated 16/255: 1 claimed successes the judge rejected" in text
    # indicators the producer did not record ("-") raise no warning
    unrecorded = format_indicators(frame.assign(claimed=None, judge_rejected=None, stalled=None))
    assert "judge rejected" in unrecorded and "claimed successes" not in unrecorded and "stopped" not in unrecorded


def test_a_query_partition_on_the_first_samples_is_measured_on_those_alone():
    """Query attacks may run on a subset (thousands of queries per sample): the sample set of every other tier
    stays whole, the query tier's figures are over the samples its partitions cover, and the adaptive tier
    (which includes the query attacker) takes the query rows into its worst case."""
    query = "query.gated.square.e16"
    spec = {**JUDGED, query: ({"model": "query", "target": "gated", "attack": "square", "eps": E16}, [2, 3],
                              "RRWR", E16)}
    table = _spec_table(spec)
    rows = _by(threat_model_table(table, {"gated": _gated(spec)}, budgets=(E16,)))
    q = rows[("gated", "query", 16)]
    assert q["samples"] == 2 and q["robust_accuracy"] == 0.5 and np.isnan(q["harm"]) and not isinstance(q["no_harm"], str)
    assert rows[("gated", "oblivious", 16)]["samples"] == 4
    adaptive = rows[("gated", "adaptive", 16)]
    # draws broke samples 0 and 1; the query attack breaks sample 2: only sample 3 holds
    assert adaptive["samples"] == 4 and adaptive["robust_accuracy"] == 0.25 and query in adaptive["attacks"]
    assert "measured on fewer samples (query attacks may cover the first ones only): gated query 16/255: 2" in \
        format_threat_models(threat_model_table(table, {"gated": _gated(spec)}, budgets=(E16,)))


def test_a_continuation_holds_only_the_samples_it_attacked():
    """A continuation (``after``, or ``focus``) writes only the samples earlier partitions left unbroken: the
    sample set stays whole, its breaks join the worst case, and its judge draw (of its own samples) has no gap."""
    cont = "adaptive.gated.lagrangian.e16"
    entry = {"model": "adaptive", "target": "gated", "attack": "lagrangian", "eps": E16, "after": [PARENT],
             "judge_draws": 2}
    spec = {**JUDGED, cont: (entry, [2, 3], "RRRW", E16),
            cont + ".r1": ({**entry, "judge_draw": 1, "judge_of": cont}, [2], "RRRR", E16)}
    table = _spec_table(spec)
    assert sorted(subset_partitions(table.metadata, table.attacks)) == [cont, cont + ".r1", PARENT + ".r1", PARENT + ".r2"]
    frame = threat_model_table(table, {"gated": _gated(spec)}, budgets=(E16,))
    adaptive = _by(frame)[("gated", "adaptive", 16)]
    # draws broke samples 0 and 1, the continuation breaks sample 3: only sample 2 holds, on all 4 samples
    assert adaptive["samples"] == 4 and adaptive["robust_accuracy"] == 0.25 and cont in adaptive["attacks"]
    assert adaptive["judge_gaps"] == 1  # the suite's draw 2 still lacks sample 2; the continuation's draw lacks none
