"""One apply path: the same rows through every command and engine give the same decisions, and a table that
`read_table` refuses is refused by every streamed command with the same message naming the column.

The Ray engine's equality with the streamed one (the same commands, reports and files) is in test_scale.py.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from logitguard import TableError, read_table
from logitguard.cli import main
from logitguard.defenses.apply import apply_batch, decide
from logitguard.defenses.decision import ABSTAIN, flag
from logitguard.defenses.detectors import load_detector
from logitguard.defenses.guard import Guard
from logitguard.evaluation.guard import fit_guard
from logitguard.report.summary import summarize

BATCH = 37


def run(*args) -> dict:
    result = CliRunner().invoke(main, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def refused(*args) -> str:
    result = CliRunner().invoke(main, list(map(str, args)))
    assert result.exit_code == 1, result.output
    return result.output


@pytest.fixture(scope="module")
def fitted(digits_split_dir, tmp_path_factory):
    """A detector (msp) and a guard (odds-free: learned detector, reject) fitted on the digits table."""
    root = tmp_path_factory.mktemp("fitted")
    run("fit-detector", digits_split_dir, "--kind", "msp", "--out", root / "detector.npz")
    fit_guard(digits_split_dir, detector="msp", corrector=None, on_flag="reject", fpr=0.05,
              budgets=(0.15,)).save(root / "guard.npz")
    return root


def _by_key(table) -> dict:
    return {k: i for i, k in enumerate(zip(table.split, table.attack, table.sample_id))}


def test_the_same_rows_through_every_command(digits_split_dir, fitted, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from logitguard.serve import create_app

    monkeypatch.setenv("LOGITGUARD_BATCH_ROWS", str(BATCH))
    table = read_table(digits_split_dir)
    detector, guard = load_detector(fitted / "detector.npz"), Guard.load(fitted / "guard.npz")
    memory = decide(guard, table.logits, table.noisy_logits if guard.needs_noise else None)

    # inspect: the bare model through the apply path equals the in-memory summary
    assert run("inspect", digits_split_dir) == json.loads(json.dumps(summarize(table)))

    # detect: flags per attack equal the one flag rule on the in-memory scores
    test = table.select(split="test")
    flags = flag(detector.score_table(test), detector.threshold_)
    rates = run("detect", digits_split_dir, "--detector", fitted / "detector.npz")["flagged_rate"]
    assert rates == {a: pytest.approx(float(flags[test.attack == a].mean())) for a in test.attacks}

    # defend (a detector alone rejects) and guard apply: the written rows equal the in-memory decision
    run("defend", digits_split_dir, "--detector", fitted / "detector.npz", "--on-flag", "reject",
        "--out", tmp_path / "defended")
    run("guard", "apply", digits_split_dir, "--guard", fitted / "guard.npz", "--out", tmp_path / "guarded")
    where = _by_key(table)
    for out in ("defended", "guarded"):
        written = read_table(tmp_path / out)
        rows = np.array([where[k] for k in zip(written.split, written.attack, written.sample_id)])
        np.testing.assert_array_equal(written.column("pred"), memory.label[rows])
        np.testing.assert_array_equal(written.column("flagged"), memory.flagged[rows])

    # serve: the HTTP service decides the same rows the same way
    client = TestClient(create_app(guard))
    rows = slice(0, 200)
    body = {"logits": table.logits[rows].tolist()}
    if guard.needs_noise:
        body["noisy_logits"] = table.noisy_logits[rows].tolist()
    answer = client.post("/v1/check", json=body).json()["results"]
    assert [r["flagged"] for r in answer] == memory.flagged[rows].tolist()
    assert [ABSTAIN if r["label"] is None else r["label"] for r in answer] == memory.label[rows].tolist()
    np.testing.assert_allclose([r["score"] for r in answer], memory.score[rows], rtol=1e-9)


def test_apply_batch_is_what_defend_table_and_guard_check_return(digits_split_table, fitted):
    guard = Guard.load(fitted / "guard.npz")
    applied = apply_batch(guard, digits_split_table)
    frame = guard.check_table(digits_split_table)
    np.testing.assert_array_equal(applied.decision.label, frame["label"].to_numpy())
    np.testing.assert_array_equal(applied.keys.sample_id, digits_split_table.sample_id)
    assert applied.output.arrow.equals(guard.defend_table(digits_split_table).arrow)
    # a detector decides flags with the one rule; a NaN score is flagged (fail closed)
    detector = load_detector(fitted / "detector.npz")
    decision = apply_batch(detector, digits_split_table).decision
    np.testing.assert_array_equal(decision.flagged, flag(decision.score, detector.threshold_))
    assert flag(np.array([np.nan, -np.inf, np.inf]), 0.0).tolist() == [True, False, True]


# -- one validation ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_classes(tmp_path_factory):
    """A directory whose partitions hold logits of 10 (clean) and 5 (pgd) classes, as variable-length lists."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for c, attack in ((10, "clean"), (5, "pgd")):
        part = root / "split=test" / f"attack={attack}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"sample_id": pa.array(np.arange(6), pa.int64()),
                                 "label": pa.array(np.arange(6) % 2, pa.int64()),
                                 "logits": pa.array(list(rng.random((6, c), dtype=np.float32)),
                                                    pa.list_(pa.float32()))}), part / "part.parquet")
    return root


@pytest.fixture(scope="module")
def float_labels(tmp_path_factory):
    """A table whose labels are floats (0.5) and whose logits are fixed-size lists (no batch read needed for C)."""
    path = tmp_path_factory.mktemp("float") / "float.parquet"
    n = 20
    logits = pa.FixedSizeListArray.from_arrays(pa.array(np.random.default_rng(0).random(n * 10, dtype=np.float32)), 10)
    pq.write_table(pa.table({"sample_id": pa.array(np.arange(n) % 10, pa.int64()), "split": ["train"] * n,
                             "attack": ["clean"] * 10 + ["fgsm"] * 10, "label": pa.array(np.full(n, 0.5)),
                             "logits": logits}), path)
    return path


@pytest.mark.parametrize("case, column", [("mixed_classes", "column 'logits'"), ("float_labels", "column 'label'")])
def test_what_read_table_refuses_every_streamed_command_refuses(case, column, request, fitted, tmp_path):
    path = request.getfixturevalue(case)
    with pytest.raises(TableError, match=column):
        read_table(path)
    commands = [
        ["inspect", path],
        ["detect", path, "--detector", fitted / "detector.npz", "--split", "test" if case == "mixed_classes" else "train"],
        ["defend", path, "--detector", fitted / "detector.npz", "--on-flag", "reject", "--out", tmp_path / "d"],
        ["guard", "apply", path, "--guard", fitted / "guard.npz", "--out", tmp_path / "g"],
    ]
    if case == "float_labels":  # (fit-detector and train-corrector read the train split, which mixed_classes lacks)
        commands.append(["fit-detector", path, "--kind", "msp", "--out", tmp_path / "f.npz"])
        commands.append(["train-corrector", path, "--attacks", "fgsm", "--split", "train", "--stream",
                         "--out", tmp_path / "c.npz", "--epochs", "1"])
    for args in commands:
        output = refused(*args)
        assert f"Error: {column}" in output and "Traceback" not in output, (args, output)
