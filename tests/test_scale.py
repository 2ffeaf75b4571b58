"""Scale-out on Ray (logitguard.engines.ray, producers.export.scale): a local Ray with 2 CPUs, one session for the module.

Every Ray run is checked against the single-process run of the same command: the same rows (per split,
attack and sample id: logits, pred, flagged, every column), the same metadata and the same report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")

from logitguard import TableSource, read_table  # noqa: E402
from logitguard.cli import main  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    from logitguard.engines.ray import init_ray

    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def run(*args: str) -> dict:
    result = CliRunner().invoke(main, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_same_table(got_path, want_path) -> None:
    """The same rows, keyed by (split, attack, sample_id), in every column, and the same metadata."""
    got, want = read_table(got_path), read_table(want_path)
    assert got.metadata == want.metadata
    assert got.columns == want.columns and len(got) == len(want)
    order_got = np.lexsort((got.sample_id, got.attack, got.split))
    order_want = np.lexsort((want.sample_id, want.attack, want.split))
    for name in got.columns:
        assert got.arrow.column(name).take(order_got).equals(want.arrow.column(name).take(order_want)), name


def without_written(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "written"}


@pytest.fixture(scope="module")
def defenses(digits_split_dir, tmp_path_factory):
    """A corrector, a learned detector on noise queries and a guard, fitted on the digits table's train split."""
    from logitguard.evaluation.guard import fit_guard

    root = tmp_path_factory.mktemp("defenses")
    run("train-corrector", digits_split_dir, "--attacks", "fgsm", "--out", root / "corrector.npz",
        "--hidden", "64", "--epochs", "10")
    run("fit-detector", digits_split_dir, "--kind", "learned-noisy", "--out", root / "detector.npz")
    fit_guard(digits_split_dir, corrector="svm", on_flag="agree", fpr=0.05, budgets=(0.15,)).save(root / "guard.npz")
    return root


# -- core: the same command on both engines ------------------------------------------------------


def test_correct_on_ray_equals_local(digits_split_dir, defenses, tmp_path):
    args = ["correct", digits_split_dir, "--corrector", defenses / "corrector.npz"]
    local = run(*args, "--out", tmp_path / "local")
    remote = run(*args, "--out", tmp_path / "ray", "--engine", "ray", "--workers", "2")
    assert without_written(remote) == without_written(local)
    assert_same_table(tmp_path / "ray", tmp_path / "local")
    assert all("/split=" in f and f.endswith(".parquet") for f in remote["written"])


def test_defend_on_ray_equals_local(digits_split_dir, defenses, tmp_path):
    args = ["defend", digits_split_dir, "--detector", defenses / "detector.npz", "--corrector",
            defenses / "corrector.npz", "--on-flag", "agree", "--split", "test"]
    local = run(*args, "--out", tmp_path / "local")
    remote = run(*args, "--out", tmp_path / "ray", "--engine", "ray")
    assert without_written(remote) == without_written(local)
    assert local["evaluation"] and 0 < local["rejected_rate"]["fgsm"] < 1
    assert_same_table(tmp_path / "ray", tmp_path / "local")


def test_guard_apply_on_ray_equals_local(digits_split_dir, defenses, tmp_path):
    args = ["guard", "apply", digits_split_dir, "--guard", defenses / "guard.npz"]
    local = run(*args, "--out", tmp_path / "local")
    remote = run(*args, "--out", tmp_path / "ray", "--engine", "ray")
    assert without_written(remote) == without_written(local)
    assert_same_table(tmp_path / "ray", tmp_path / "local")
    assert read_table(tmp_path / "ray").splits == ["test", "train"]


def test_detect_on_ray_equals_local(digits_split_dir, defenses):
    args = ["detect", digits_split_dir, "--detector", defenses / "detector.npz"]
    local = run(*args)
    assert run(*args, "--engine", "ray") == local
    assert local["metrics"] and {m["attack"] for m in local["metrics"]} == {"bim", "fgsm"}


def test_python_entry_point_takes_a_ray_dataset(digits_split_dir, digits_split_table, defenses, tmp_path):
    from logitguard import write_table
    from logitguard.defenses.guard import Guard
    from logitguard.engines.ray import apply_ray, read_ray, write_ray

    guard = Guard.load(defenses / "guard.npz")
    write_table(guard.defend_table(digits_split_table.select(split="test")), tmp_path / "local",
                partition_by=("split", "attack"))
    dataset = read_ray(TableSource(digits_split_dir, split="test"))
    written = write_ray(apply_ray(dataset, defenses / "guard.npz", kind="guard"), tmp_path / "ray")
    assert written and all(p.exists() for p in written)
    assert_same_table(tmp_path / "ray", tmp_path / "local")
    # Detector rows: one per input row, flags as Detector.flag gives them.
    from logitguard.defenses.detectors import load_detector

    rows = apply_ray(read_ray(digits_split_dir), defenses / "detector.npz", kind="detector").to_pandas()
    detector = load_detector(defenses / "detector.npz")
    table = read_table(digits_split_dir)
    expected = dict(zip(zip(table.split, table.attack, table.sample_id), detector.flag_table(table)))
    assert len(rows) == len(table)
    assert all(expected[(r.split, r.attack, r.sample_id)] == r.flagged for r in rows.itertuples())


# -- core: outputs, errors ---------------------------------------------------------------------------


def test_ray_output_is_replaced_as_a_whole_and_never_overwritten_silently(digits_split_dir, defenses, tmp_path):
    out = tmp_path / "out"
    args = ["guard", "apply", digits_split_dir, "--guard", defenses / "guard.npz", "--out", out, "--engine", "ray"]
    run(*args[:-2])  # the old output: both splits
    refused = CliRunner().invoke(main, list(map(str, args)))
    assert refused.exit_code == 1 and "refusing to overwrite" in refused.output
    run(*args[:-2], "--split", "test", "--force", "--engine", "ray")
    assert read_table(out).splits == ["test"]  # the old train partitions are gone, not mixed in
    assert all(p.relative_to(out).parts[0] == "split=test" for p in out.rglob("*.parquet"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left beside it


def test_ray_errors_are_clear(digits_split_dir, defenses, tmp_path):
    guard = ["guard", "apply", digits_split_dir, "--guard", defenses / "guard.npz", "--engine", "ray"]
    result = CliRunner().invoke(main, list(map(str, [*guard, "--out", tmp_path / "one.parquet"])))
    assert result.exit_code == 1 and "writes a partitioned directory" in result.output
    result = CliRunner().invoke(main, list(map(str, [*guard, "--out", tmp_path / "x", "--split", "nope"])))
    assert result.exit_code == 1 and "no rows match split='nope'" in result.output
    result = CliRunner().invoke(main, ["detect", str(digits_split_dir), "--detector", str(defenses / "detector.npz"),
                                       "--workers", "2"])
    assert result.exit_code == 2 and "--workers applies to --engine ray" in result.output
    # Rows repeated in two files (each batch is fine on its own): refused before anything is committed.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits_split_dir, copy)
    part = next((copy / "split=test" / "attack=clean").glob("*.parquet"))
    shutil.copy(part, part.with_name("again.parquet"))
    result = CliRunner().invoke(main, list(map(str, ["guard", "apply", copy, "--guard", defenses / "guard.npz",
                                                     "--engine", "ray", "--out", tmp_path / "dup"])))
    assert result.exit_code == 1 and "duplicate row for (split='test', attack='clean'" in result.output
    assert not (tmp_path / "dup").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_whole_table_checks_across_batches():
    import pyarrow as pa

    from logitguard.engines.ray.actors import rows_of
    from logitguard.errors import TableError

    keys = pa.table({"split": ["test", "test"], "attack": ["clean", "clean"], "sample_id": [3, 3], "label": [1, 1]})
    with pytest.raises(TableError, match="duplicate row for \\(split='test', attack='clean', sample_id=3\\)"):
        rows_of([keys.slice(0, 1), keys.slice(1, 1)], {})


def test_a_missing_ray_extra_is_an_error_not_a_traceback(digits_split_dir, defenses, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    for name in [m for m in sys.modules if m.startswith("logitguard.engines.ray")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr("logitguard.engines.ray")
    result = CliRunner().invoke(main, ["detect", str(digits_split_dir), "--detector", str(defenses / "detector.npz"),
                                       "--engine", "ray"])
    assert result.exit_code == 1 and "needs the 'ray' extra" in result.output


# -- producer: export on Ray ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_stem(digits_cnn, tmp_path_factory):
    from producers.models.classifiers import save_model

    stem = tmp_path_factory.mktemp("model") / "digits-cnn"
    save_model(digits_cnn, stem)
    return stem


def produce(*args: str) -> dict:
    from producers.cli import main as produce_main

    result = CliRunner().invoke(produce_main, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_export_on_ray_equals_the_single_process_shards(cnn_stem, tmp_path):
    from producers.errors import ProducerError

    args = ["export", "--dataset", "digits", "--model", cnn_stem, "--attacks", "clean,fgsm,pgd",
            "--param", "fgsm.eps=0.1", "--param", "pgd.eps=0.1", "--param", "pgd.steps=3", "--train-samples", "60",
            "--test-samples", "40", "--max-samples", "pgd=30", "--noise-queries", "2", "--noise",
            "gaussian:0.05,sign:0.05"]
    for i in range(2):
        produce(*args, "--shard", f"{i}/2", "--out", tmp_path / "local")
    report = produce(*args, "--engine", "ray", "--workers", "2", "--out", tmp_path / "ray")
    local_files = sorted(str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*.parquet"))
    assert sorted(str(Path(p).relative_to(tmp_path / "ray")) for p in report["written"]) == local_files
    assert len(local_files) == 12
    assert {t["shard"] for t in report["timings"]} == {0, 1}
    assert_same_table(tmp_path / "ray", tmp_path / "local")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    # A rerun finds every partition done; another shard layout is refused before any work.
    again = produce(*args, "--engine", "ray", "--workers", "2", "--out", tmp_path / "ray")
    assert again["written"] == [] and len(again["skipped"]) == 12
    from producers.cli import main as produce_main

    refused = CliRunner().invoke(produce_main, list(map(str, [*args, "--engine", "ray", "--workers", "3",
                                                              "--out", tmp_path / "ray"])))
    assert refused.exit_code == 1 and "written as 2 shards" in refused.output
    refused = CliRunner().invoke(produce_main, list(map(str, [*args, "--engine", "ray", "--shard", "0/2",
                                                              "--out", tmp_path / "x"])))
    assert refused.exit_code == 1 and "--shard is for single-process runs" in refused.output
    # A run that fails in its actors (classes that disagree with the model) adds nothing to the table.
    from producers.data.datasets import load_dataset
    from producers.models.classifiers import load_model
    from producers.export.scale import export_ray

    before = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*"))
    test = load_dataset("digits", "test")
    wrong = test.__class__(test.name, test.split, test.labels, test.class_names[:5], test.image_shape, test.load)
    with pytest.raises(ProducerError, match="outputs but the dataset has 5 classes"):
        export_ray(load_model(cnn_stem), {"test": wrong}, out=tmp_path / "ray", workers=2, attacks=["clean", "bim"],
                   samples={"test": 40}, seed=0)
    assert sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*")) == before
