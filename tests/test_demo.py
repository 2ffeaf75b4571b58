"""The demo (main job) end to end on the digits table, and the explain command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from logitguard import LogitguardError, write_table
from logitguard.cli import main
from logitguard.report.demo import FIGURES, run_demo


@pytest.fixture(scope="module")
def report(digits_split_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    steps: list[str] = []
    summary = run_demo(digits_split_dir, out, log=steps.append)
    return out, summary, steps


def test_demo_writes_the_report_summary_and_figures(report):
    out, summary, steps = report
    text = (out / "report.md").read_text()
    for heading in ("## 1. Correction", "## 2. Transfer", "## 3. Clean vs robust", "## 4. Detectors",
                    "## 5. Gated pipelines", "## 6. Supporting classes", "## 7. Does supporting-class",
                    "## Seed claims on our data"):
        assert heading in text
    for figure in FIGURES:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["transfer"].keys() == {"clean", "bim", "fgsm"}
    assert {d["detector"] for d in saved["detection"]} >= {"msp", "odds", "learned-noisy"}
    assert len(steps) >= 6 and steps[-1].endswith("report.md")  # progress was reported


def test_demo_numbers_come_from_the_analyses(report, digits_split_table):
    _, summary, _ = report
    rows = {(r["attack"], r["subset"], r["defense"]): r for r in summary["accuracy"]}
    undefended = rows[("fgsm", "full", "none")]
    corrected = next(r for k, r in rows.items() if k[:2] == ("fgsm", "full") and k[2] != "none")
    assert corrected["robust_accuracy"] > undefended["robust_accuracy"] + 0.1
    test = digits_split_table.select(split="test", attacks="fgsm")
    assert undefended["robust_accuracy"] == pytest.approx((test.logits.argmax(1) == test.labels).mean())
    for ablation in summary["ablation"]:
        assert ablation["accuracy_supporting_lowered"] < ablation["accuracy_random_lowered"]


def test_demo_refuses_to_replace_a_report_and_bad_tables(report, digits_split_table, tmp_path):
    out, _, _ = report
    with pytest.raises(LogitguardError, match="refusing to overwrite existing file"):
        run_demo("unused", out)
    only_test = tmp_path / "test-only.parquet"
    write_table(digits_split_table.select(split="test"), only_test)
    with pytest.raises(LogitguardError, match=r"the demo needs 'train' and 'test' splits; missing \['train'\]"):
        run_demo(only_test, tmp_path / "r")


def test_demo_and_explain_commands(digits_split_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--data", str(digits_split_dir), "--out", str(tmp_path / "r"), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert f"report: {tmp_path / 'r' / 'report.md'}" in result.output
    assert not (tmp_path / "r" / "transfer.png").exists()
    corrector = tmp_path / "c.pt"
    assert runner.invoke(main, ["train-corrector", str(digits_split_dir), "--attacks", "fgsm", "--out", str(corrector),
                                "--hidden", "128", "--epochs", "30", "--lr", "1e-3"]).exit_code == 0
    result = runner.invoke(main, ["explain", str(digits_split_dir), "--corrector", str(corrector), "--json"])
    assert result.exit_code == 0, result.output
    explained = json.loads(result.output)
    assert set(explained["top"]) == {"bim", "fgsm"} and len(explained["top"]["fgsm"]) == 3
    assert explained["bhattacharyya"]["fgsm"]["fgsm"] == pytest.approx(1.0)
    text = runner.invoke(main, ["explain", str(digits_split_dir), "--corrector", str(corrector)])
    assert text.exit_code == 0 and text.output.startswith("top-3 supporting classes")


def test_demo_without_saved_pipelines_says_its_figures_are_oblivious(report):
    out, summary, _ = report
    text = (out / "report.md").read_text()
    assert "threat_models" not in summary
    assert "No saved pipelines" in text and "hold only against an *oblivious* attacker" in text
    assert "## 1. Correction (seed Tables 1–2; oblivious)" in text


def test_threat_section_on_the_embedded_table():
    """The report's opening section, measured on the embedded partitions against data/defenses: relabelling
    pipelines fall below the bare model against the adaptive attacker, rejecting ones do not."""
    from pathlib import Path

    from logitguard import read_table
    from logitguard.report.demo import _threat_models, _threat_section

    root = Path(__file__).resolve().parents[1] / "data"
    threat = _threat_models(read_table(root / "fashion-mnist", split="test"), root / "defenses" / "defenses.json")
    adaptive = threat[threat.threat_model == "adaptive"].set_index(["pipeline", "eps"]).harm
    assert (adaptive.loc[["ln-reject", "ln-agree"]] >= 0).all()
    assert (adaptive.loc[["corrector", "ln-corrector", "ln-odds", "odds-odds"]] < 0).all()
    text = "\n".join(_threat_section(threat))
    assert "| pipeline | clean | coverage | oblivious 8/255 | transfer 8/255 | surrogate 8/255 | adaptive 8/255 |" in text
    assert "**We recommend `ln-" in text and "`ln-odds` (" in text
    assert "missed @1% · adaptive 16/255" in text
