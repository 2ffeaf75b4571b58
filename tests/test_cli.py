"""The `logitguard` CLI, driven through click's CliRunner."""

from __future__ import annotations

import json

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from logitguard import write_table
from logitguard.cli import main
from producers.cli import main as produce_main


@pytest.fixture
def table_path(digits_table, tmp_path):
    path = tmp_path / "digits.parquet"
    write_table(digits_table, path)
    return path


def _commands(group: click.Group):
    return [(name, cmd) for name, cmd in group.commands.items()]


@pytest.mark.parametrize("group", [main, produce_main], ids=["logitguard", "logitguard-produce"])
def test_every_command_has_help_text(group):
    assert group.help
    for name, command in _commands(group):
        assert command.help, f"command {name!r} has no help text"
        result = CliRunner().invoke(group, [name, "--help"])
        assert result.exit_code == 0, result.output


def test_inspect_reports_what_the_logits_say(table_path, digits_arrays):
    result = CliRunner().invoke(main, ["inspect", str(table_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["num_rows"] == 2 * len(digits_arrays["labels"])
    assert summary["num_classes"] == 10 and summary["noise_queries"] == [3, 10]
    by_attack = {c["attack"]: c for c in summary["conditions"]}
    y = digits_arrays["labels"]
    clean_ok = digits_arrays["clean"].argmax(1) == y
    fgsm_ok = digits_arrays["fgsm"].argmax(1) == y
    assert by_attack["clean"]["accuracy"] == pytest.approx(clean_ok.mean())
    assert by_attack["fgsm"]["accuracy"] == pytest.approx(fgsm_ok.mean())
    assert by_attack["fgsm"]["attack_success_rate"] == pytest.approx((~fgsm_ok[clean_ok]).mean())
    assert by_attack["clean"]["attack_success_rate"] is None
    assert by_attack["fgsm"]["linf_mean"] == pytest.approx(np.float32(digits_arrays["linf"]).mean(), rel=1e-6)
    assert by_attack["fgsm"]["l2_median"] == pytest.approx(np.median(np.float32(digits_arrays["l2"])), rel=1e-6)
    # A real attack on a real model: it must have done something.
    assert by_attack["fgsm"]["accuracy"] < by_attack["clean"]["accuracy"] - 0.2
    assert summary["metadata"]["attacks"] == {"fgsm": {"eps": 0.15}}


def test_inspect_text_output(table_path, digits_arrays):
    result = CliRunner().invoke(main, ["inspect", str(table_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    n = len(digits_arrays["labels"])
    assert lines[0].startswith(f"rows: {2 * n}    classes: 10 (digit-0, digit-1,")
    assert lines[1] == "noise queries: K=3 x C=10"
    clean_acc = 100 * (digits_arrays["clean"].argmax(1) == digits_arrays["labels"]).mean()
    row = next(line for line in lines if line.startswith("test   clean"))
    assert row.split()[2:4] == [str(n), f"{clean_acc:.1f}%"]
    assert "attack fgsm: eps=0.15" in lines


def test_inspect_errors_are_one_line_without_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tmp_path / "missing.parquet")])
    assert result.exit_code == 1
    assert result.output == f"Error: no such file or directory: {tmp_path / 'missing.parquet'}\n"
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sample_id": [0], "split": ["t"], "attack": ["clean"], "label": [0]}), bad)
    result = runner.invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 1
    assert result.output == "Error: missing required column(s) ['logits']\n"


def test_inspect_works_on_unlabelled_deployment_data(tmp_path):
    from logitguard import LogitTable

    table = LogitTable.from_arrays(logits=np.eye(3), sample_id=[0, 1, 2], split="deploy", attack="clean")
    write_table(table, tmp_path / "d.parquet")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "d.parquet"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["conditions"][0]["accuracy"] is None
