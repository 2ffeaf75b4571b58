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
    """The report's opening, measured on the embedded partitions against data/defenses: relabelling pipelines
    fall below the bare model against the adaptive attacker, rejecting ones do not, and the summary recommends
    a rejecting one with its adaptive figure as the headline."""
    from pathlib import Path

    from logitguard import read_table
    from logitguard.report.demo import _threat_models
    from logitguard.report.threats import summary_section, threat_section

    root = Path(__file__).resolve().parents[1] / "data"
    threat = _threat_models(read_table(root / "fashion-mnist", split="test"), root / "defenses" / "defenses.json")
    adaptive = threat[threat.threat_model == "adaptive"].set_index(["pipeline", "eps"]).harm
    assert (adaptive.loc[["ln-reject", "ln-agree"]] >= 0).all()
    assert (adaptive.loc[["corrector", "ln-corrector", "ln-odds", "odds-odds"]] < 0).all()
    text = "\n".join(threat_section(threat, threat.attrs["describe"]))
    assert "| pipeline | ε | clean | coverage | transfer |" in text and "| adaptive |" in text
    assert "missed @1% · adaptive 16/255" in text
    summary = "\n".join(summary_section(threat, threat.attrs["describe"]))
    assert "**What to deploy:** `ln-" in summary and "**adaptive (headline)**" in summary
    assert "`ln-odds`" in summary.split("**Do not deploy")[1]
    if "no_harm" not in threat.columns:  # no interval: the claim cannot be made
        assert "does no harm" not in summary and "not established" in summary


def test_report_reads_as_a_report_not_a_work_log(report):
    """The report opens with the summary; every numbered section quotes the seeds' figures; no project issue
    numbers, internal targets or 'not available offline' notes."""
    import re

    out, _, _ = report
    text = (out / "report.md").read_text()
    headings = re.findall(r"^## .*$", text, flags=re.M)
    assert headings[0] == "## Summary" and text.index("## Summary") < text.index("## About this report")
    assert not re.search(r"\bissues? \d", text, flags=re.I)
    assert not re.search(r"\btarget\s*[≥≤<>=]?\s*\d", text, flags=re.I)  # "target 0.95", "target ≥ 97%"
    assert "not available offline" not in text
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    numbered = [s for s in sections if re.match(r"\d+\. |Threat models", s)]
    assert len(numbered) >= 8
    for section in numbered:
        assert "**Reference**" in section, section.splitlines()[0]


def test_reference_blocks_quote_the_seeds_with_their_setting(tmp_path):
    from logitguard.report.published import SECTIONS, load_reference, reference_block

    seeds = {"li2019": {"table1_pgd": {"resnet50": {
        "clean_full_none": 0.7613, "clean_full_corrected": 0.7385, "pgd_full_none": 0.0, "pgd_full_corrected": 0.7239,
        "clean_selected_none": 1.0, "clean_selected_corrected": 0.965, "pgd_selected_none": 0.0,
        "pgd_selected_corrected": 0.754}}}}
    path = tmp_path / "seed-figures.json"
    path.write_text(json.dumps(seeds))
    loaded = load_reference(tmp_path)  # a folder holding the file
    block = reference_block("correction", loaded)
    assert block.startswith("**Reference**") and "not ours" in block
    assert "Li et al. 2019, Table 1" in block and "ResNet-50" in block and "PGD 0.0% → 75.4%" in block
    assert "has no figure" in reference_block("transfer", loaded)  # a section the file has nothing for
    missing = reference_block("correction", load_reference(tmp_path / "absent.json"))
    assert missing.startswith("**Reference**") and "were not found" in missing
    assert set(SECTIONS) >= {"threat", "correction", "detection", "model_side"}


def test_summary_claims_no_harm_only_where_the_interval_allows():
    import pandas as pd

    from logitguard.report.summary import format_with_interval
    from logitguard.report.threats import recommend, summary_section, threat_section

    assert format_with_interval(0.634, 0.601, 0.665) == "63.4% [60.1, 66.5]"
    assert format_with_interval(0.634) == "63.4%" and format_with_interval(0.634, float("nan"), 0.7) == "63.4%"
    assert format_with_interval(0.041, -0.012, 0.07, signed=True) == "+4.1 pt [-1.2, +7.0]"

    def row(pipeline, tier, eps, robust, harm, low, high):
        return {"pipeline": pipeline, "threat_model": tier, "eps": eps, "samples": 100, "draws": 5,
                "clean_accuracy": 0.99, "clean_accuracy_low": 0.95, "clean_accuracy_high": 1.0, "coverage": 0.99,
                "coverage_low": 0.95, "coverage_high": 1.0, "robust_accuracy": robust,
                "robust_accuracy_low": robust - 0.05, "robust_accuracy_high": robust + 0.05,
                "robust_single_draw": robust + 0.01, "harm": harm, "harm_low": low, "harm_high": high,
                "no_harm": "established" if low >= 0 else "not established", "attacks": []}

    frame = pd.DataFrame([row("none", "adaptive", 8 / 255, 0.5, 0.0, 0.0, 0.0),
                          row("none", "adaptive", 16 / 255, 0.2, 0.0, 0.0, 0.0),
                          row("sure", "query", 8 / 255, 0.7, 0.2, 0.1, 0.3),
                          row("sure", "adaptive", 8 / 255, 0.55, 0.05, 0.01, 0.09),
                          row("sure", "adaptive", 16 / 255, 0.25, 0.05, 0.0, 0.1),
                          row("unsure", "adaptive", 8 / 255, 0.6, 0.1, -0.01, 0.2),
                          row("unsure", "adaptive", 16 / 255, 0.3, 0.1, -0.02, 0.2)])
    assert recommend(frame) == ("sure", True)  # the higher estimate loses: its no-harm is not established
    text = "\n".join(summary_section(frame))
    assert "**What to deploy:** `sure`" in text and "| query |" in text
    assert "55.0% [50.0, 60.0]" in text and "+5.0 pt [+1.0, +9.0]: does no harm" in text
    assert "5 fresh noise draws" in text
    unsure = frame[frame.pipeline != "sure"]
    assert recommend(unsure) == ("unsure", False)
    text = "\n".join(summary_section(unsure))
    assert "does no harm" not in text and "+10.0 pt [-1.0, +20.0]: no harm **not established**" in text
    table = "\n".join(threat_section(frame))
    assert "| pipeline | ε | clean | coverage | query | adaptive | adaptive, draw 0 only | harm (adaptive − model) | no harm |" in table
    assert "| sure | 8/255 | 99.0% [95.0, 100.0] | 99.0% [95.0, 100.0] | 70.0% [65.0, 75.0] | 55.0% [50.0, 60.0] | 56.0% |" in table
    old = unsure.drop(columns=[c for c in unsure.columns if c.endswith(("_low", "_high")) or c == "no_harm"])
    text = "\n".join(summary_section(old))  # a table from before the intervals: no bracket, no claim
    assert "[" not in text.split("## Summary")[1] and "no interval measured" in text


def test_threat_curves_draw_every_tier(tmp_path):
    pytest.importorskip("matplotlib")
    import pandas as pd

    from logitguard.report.plots import threat_curves

    frame = pd.DataFrame([{"pipeline": p, "threat_model": t, "eps": e, "clean_accuracy": 1.0, "robust_accuracy": r,
                           "robust_accuracy_low": r - 0.05, "robust_accuracy_high": r + 0.05}
                          for p in ("none", "guard") for t, r in (("oblivious", 0.6), ("adaptive", 0.4))
                          for e in (8 / 255, 16 / 255)])
    out = threat_curves(frame, tmp_path / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    old = threat_curves(frame.drop(columns=["robust_accuracy_low", "robust_accuracy_high"]), tmp_path / "o.png")
    assert old.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a table without intervals draws without error bars
