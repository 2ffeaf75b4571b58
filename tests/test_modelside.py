"""The model-side comparison: per-model threat figures and detector AUROCs from tables and saved pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from logitguard import LogitguardError, LogitTable
from logitguard.cli import main
from logitguard.defenses.detectors import make_detector
from logitguard.evaluation.metrics import auroc
from logitguard.evaluation.modelside import compare_models, detection_aurocs, parse_model_specs
from logitguard.report.modelside import format_model_side
from logitguard.defenses.pipelines import load_pipelines, save_pipelines
from logitguard.tables import pair
from logitguard.evaluation.threat import threat_model_table

from conftest import DIGITS_EPS


@pytest.fixture(scope="module")
def manifest(digits_train, tmp_path_factory):
    folder = tmp_path_factory.mktemp("modelside")
    msp = make_detector("msp", fpr=0.1).fit_table(digits_train).save(folder / "msp.npz")
    return save_pipelines(folder / "defenses.json", {"none": {}, "msp-reject": {"detector": msp, "on_flag": "reject"}})


def test_threat_figures_are_the_threat_tables_own(digits_split_dir, digits_split_table, manifest):
    results = compare_models({"a": (digits_split_dir, manifest)}, pipeline="msp-reject", budgets=(DIGITS_EPS,))
    expected = threat_model_table(digits_split_table.select(split="test"),
                                  {"msp-reject": load_pipelines(manifest)["msp-reject"].build()}, budgets=(DIGITS_EPS,))
    got = {(r["pipeline"], r["threat_model"]): r["robust_accuracy"] for r in results["threat"]}
    assert got == {(r.pipeline, r.threat_model): r.robust_accuracy for r in expected.itertuples()}
    assert got[("msp-reject", "oblivious")] > got[("none", "oblivious")]  # rejecting flagged rows helps here
    (model,) = results["models"]
    test = digits_split_table.select(split="test", attacks="clean")
    assert model["clean_accuracy"] == pytest.approx((test.logits.argmax(1) == test.labels).mean())
    json.dumps(results, allow_nan=False)  # JSON-ready: NaN became None


def test_aurocs_follow_seed_001s_positives(digits_train, digits_split_table):
    records = {(r["detector"], r["attack"]): r for r in detection_aurocs(digits_split_table, "m")}
    assert {d for d, _ in records} == {"msp", "nonme"}  # no features / insen / external columns here
    test = digits_split_table.select(split="test")
    clean, attacked = pair(test, "fgsm")
    fooled = (clean.logits.argmax(1) == clean.labels) & (attacked.logits.argmax(1) != attacked.labels)
    msp = make_detector("msp").fit_table(digits_train)
    expected = auroc(msp.score_table(clean.take(fooled)), msp.score_table(attacked.take(fooled)))
    assert records[("msp", "fgsm")]["auroc"] == pytest.approx(expected)
    assert records[("msp", "fgsm")]["positives"] == int(fooled.sum()) > 5
    assert records[("msp", "fgsm")]["threat_model"] == "oblivious"


def test_report_lines_and_cli(digits_split_dir, manifest, tmp_path):
    out = tmp_path / "cmp.json"
    args = ["compare-models", f"a={digits_split_dir}:{manifest}", f"b={digits_split_dir}:{manifest}",
            "--pipeline", "msp-reject", "--budgets", str(DIGITS_EPS), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert [m["model"] for m in results["models"]] == ["a", "b"]
    text = "\n".join(format_model_side(results))
    assert "| a | msp-reject |" in text and "| b | none |" in text and "**Detector AUROC**" in text
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "Error:" in again.output and "overwrite" in again.output
    missing = CliRunner().invoke(main, [*args[:-2], "--pipeline", "nope", "--out", str(tmp_path / "x.json")])
    assert missing.exit_code != 0 and "no pipeline 'nope'" in missing.output


def test_model_specs_are_checked():
    assert parse_model_specs(["ce=a/t:b/d.json"]) == {"ce": (Path("a/t"), Path("b/d.json"))}
    assert parse_model_specs(["g=t"]) == {"g": (Path("t"), None)}
    for bad in (["ce"], ["ce=t:"], ["=t:m"], ["a=t:m", "a=u:n"]):
        with pytest.raises(LogitguardError):
            parse_model_specs(bad)
    with pytest.raises(LogitguardError, match="at least one"):
        compare_models({})


def test_external_system_figures_by_hand(digits_split_table, tmp_path):
    from logitguard import write_table
    from logitguard.evaluation.modelside import external_accuracy

    test = digits_split_table.select(split="test")
    rng = np.random.default_rng(0)
    score = rng.random(len(test)).astype(np.float32)
    rectified = np.where(rng.random(len(test)) < 0.7, test.labels, (test.labels + 1) % 10)
    arrays = {c: getattr(test, c) for c in ("logits", "sample_id", "split", "attack", "noisy_logits")}
    table = LogitTable.from_arrays(**arrays, label=test.labels, external_score=score, external_label=rectified,
                                   metadata=test.metadata)
    records = {r["attack"]: r for r in external_accuracy(table, "g")}
    assert set(records) == {"fgsm", "bim"}
    rows = table.attack == "bim"
    defended = np.where(score > 0.5, rectified, table.logits.argmax(1))
    assert records["bim"]["rectified_accuracy"] == pytest.approx((rectified[rows] == table.labels[rows]).mean())
    assert records["bim"]["pipeline_accuracy"] == pytest.approx((defended[rows] == table.labels[rows]).mean())
    assert records["bim"]["detection_rate"] == pytest.approx((score[rows] > 0.5).mean())
    clean = table.attack == "clean"
    assert records["bim"]["false_positive_rate"] == pytest.approx((score[clean] > 0.5).mean())
    # A table without a manifest (and without a train split) gives detection and external figures only.
    path = tmp_path / "g"
    write_table(table, path, partition_by=("split", "attack"))
    results = compare_models({"g": (path, None)}, budgets=(DIGITS_EPS,))
    assert results["threat"] == [] and {r["detector"] for r in results["detection"]} == {"msp", "nonme", "external"}
    assert "**GRED**" in "\n".join(format_model_side(results))
