"""The exporter's output is all-or-nothing: partitions are staged beside --out and added in one step, a
killed export resumes from what it staged (only when the settings match), a partition made with other
settings is refused, two runs of one shard cannot stage at once, and bad locations or parameters are an
`Error:` before a model is loaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from logitguard import read_table
from producers.export import execute
from producers.cli import main
from producers.errors import ProducerError
from producers.export.logits import export
from producers.export.plan import Shard
from producers.models.classifiers import save_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SAMPLES = {"train": 40, "test": 30}


def _run(model, sets, out, **kwargs):
    options = dict(attacks=["clean", "fgsm"], samples=SAMPLES, attack_params={"fgsm": {"eps": 0.1}}, noise=None,
                   progress=False)
    options.update(kwargs)
    return export(model, dict(zip(("train", "test"), sets)), out=out, **options)


def _count_partitions(monkeypatch, fail_at: int | None = None) -> list[str]:
    """Record every partition computed; raise at call number `fail_at` (a crash mid-export)."""
    calls, real = [], execute.export_partition

    def counting(model, data, rows, **kwargs):
        calls.append(f"{data.split}/{kwargs['attack']}")
        if len(calls) == fail_at:
            raise RuntimeError("crash")
        return real(model, data, rows, **kwargs)

    monkeypatch.setattr(execute, "export_partition", counting)  # what `export` runs
    return calls


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_killed_export_leaves_out_untouched_and_the_rerun_resumes(digits_cnn, digits_sets, tmp_path, monkeypatch):
    stem = tmp_path / "cnn"
    save_model(digits_cnn, stem)
    out = tmp_path / "table"
    code = """
        import os, signal, sys
        from producers.export import execute, logits as ex
        from producers.data.datasets import load_dataset
        from producers.models.classifiers import load_model
        real, calls = execute.export_partition, []
        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        execute.export_partition = dying
        ex.export(load_model(sys.argv[1]), {s: load_dataset("digits", s) for s in ("train", "test")},
                  attacks=["clean", "fgsm"], out=sys.argv[2], samples={"train": 40, "test": 30},
                  attack_params={"fgsm": {"eps": 0.1}}, noise=None, progress=False)
    """
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(stem), str(out)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not out.exists()  # nothing of the killed run is visible as a table
    stage = tmp_path / ".table.resume-shard-0-of-1"
    assert sorted(str(p.relative_to(stage)) for p in stage.rglob("*.parquet")) == [
        "split=train/attack=clean/shard-0-of-1.parquet", "split=train/attack=fgsm/shard-0-of-1.parquet"]
    calls = _count_partitions(monkeypatch)
    report = _run(digits_cnn, digits_sets, out)
    assert calls == ["test/clean", "test/fgsm"]  # the two staged partitions were not recomputed
    assert len(report.written) == 4 and not report.skipped
    table = read_table(out)
    assert table.attacks == ["clean", "fgsm"] and len(table) == 2 * 40 + 2 * 30
    assert _leftovers(tmp_path) == []
    # Resumed or not, the rows are the same as an export that was never interrupted.
    _run(digits_cnn, digits_sets, tmp_path / "fresh")
    a, b = table, read_table(tmp_path / "fresh")
    ka, kb = (np.lexsort((t.sample_id, t.attack, t.split)) for t in (a, b))
    np.testing.assert_array_equal(a.logits[ka], b.logits[kb])


def test_resume_redoes_what_was_staged_with_other_settings(digits_cnn, digits_sets, tmp_path, monkeypatch):
    out = tmp_path / "table"
    _count_partitions(monkeypatch, fail_at=2)
    with pytest.raises(RuntimeError, match="crash"):
        _run(digits_cnn, digits_sets, out, attacks=["fgsm", "clean"])
    assert not out.exists()
    calls = _count_partitions(monkeypatch)
    _run(digits_cnn, digits_sets, out, attacks=["fgsm", "clean"], attack_params={"fgsm": {"eps": 0.05}})
    assert calls == ["train/fgsm", "train/clean", "test/fgsm", "test/clean"]  # the eps=0.1 partition was redone
    table = read_table(out)
    assert table.metadata["attacks"]["fgsm"]["eps"] == 0.05
    assert table.column("linf").max() <= 0.05 + 1e-6


def test_a_partition_made_with_other_samples_is_refused_before_any_attack(digits_cnn, digits_sets, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "table"
    _run(digits_cnn, digits_sets, out, attacks=["clean"], attack_params={})
    calls = _count_partitions(monkeypatch)
    with pytest.raises(ProducerError, match=r"already exists and holds 30 rows of other samples than the 20"):
        _run(digits_cnn, digits_sets, out, attacks=["clean", "fgsm"], samples={"train": 40, "test": 20})
    assert calls == [] and read_table(out).attacks == ["clean"]
    assert _leftovers(tmp_path) == []


def test_two_runs_of_one_shard_cannot_stage_at_once(digits_cnn, digits_sets, tmp_path):
    out = tmp_path / "table"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from logitguard.files import StagedDirectory
            StagedDirectory(sys.argv[1], resume_key="shard-0-of-2")
            print("holding", flush=True)
            time.sleep(60)
        """), str(out)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(ProducerError, match="another run is writing"):
            _run(digits_cnn, digits_sets, out, shard=Shard(0, 2))
        report = _run(digits_cnn, digits_sets, out, shard=Shard(1, 2))  # another shard goes ahead
        assert len(report.written) == 4
    finally:
        holder.kill()  # its lock goes with it: shard 0 can run now
        holder.wait()
    _run(digits_cnn, digits_sets, out, shard=Shard(0, 2))
    assert len(read_table(out)) == 2 * 40 + 2 * 30


def test_bad_locations_and_parameters_fail_before_the_model_is_loaded(tmp_path):
    runner = CliRunner()
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    result = runner.invoke(main, ["export", "--dataset", "digits", "--model", str(tmp_path / "no-model"),
                                  "--out", f"{blocker}/table"])
    assert result.exit_code == 1
    assert result.output == f"Error: cannot write {blocker}/table: {blocker} is a file, not a directory\n"
    result = runner.invoke(main, ["train", "--dataset", "digits", "--out", f"{blocker}/cnn"])
    assert result.exit_code == 1 and result.output.startswith(f"Error: cannot write {blocker}/cnn.pt: ")
    base = ["attack-defenses", "--dataset", "digits", "--model", str(tmp_path / "no-model"),
            "--defenses", str(DATA / "defenses" / "defenses.json"), "--out", str(tmp_path)]
    for extra, message in [
        (["--param", "foo=1"], "unknown parameter(s) ['foo'] for --param for attack routes; accepted: ['eps', "),
        (["--param", "steps=-1"], "--param for attack routes: steps must be a positive integer, got -1"),
        (["--param", 'loss="hinge"', "--attacks", "defended-pgd"],
         "--param for attack defended-pgd: loss must be 'ce' or 'margin', got 'hinge'"),
        (["--param", "eps=0.1"], "--param eps: the budgets come from --budgets"),
        (["--budgets", "2"], "--budgets must be at most 1 (pixels in [0, 1]), got '2'"),
        (["--attacks", "pgd"], "--attacks takes defense-aware attacks ['defended-pgd', 'evade', 'routes', "),
    ]:
        result = runner.invoke(main, base + extra)
        assert result.exit_code == 1, (extra, result.output)
        assert result.output.startswith(f"Error: {message}"), (extra, result.output)


def test_a_finished_partition_made_with_other_attack_parameters_is_refused_before_any_attack(
        digits_cnn, digits_sets, tmp_path, monkeypatch):
    """Resume skips finished partitions only when their attack parameters match (`partition_mismatch`)."""
    out = tmp_path / "table"
    _run(digits_cnn, digits_sets, out)  # fgsm at eps=0.1
    calls = _count_partitions(monkeypatch)
    with pytest.raises(ProducerError, match=r"table already holds attack 'fgsm' with attacks \{'eps': 0\.1\} \(.*"
                                            r"attack=fgsm/shard-0-of-1\.parquet\); this export would write "
                                            r"\{'eps': 0\.05\}; use another alias or --out"):
        _run(digits_cnn, digits_sets, out, attack_params={"fgsm": {"eps": 0.05}})
    assert calls == []
    _run(digits_cnn, digits_sets, out)  # the same parameters: everything is skipped
    assert calls == [] and read_table(out).metadata["attacks"]["fgsm"] == {"eps": 0.1}


def test_existing_outputs_are_refused_before_data_or_models_are_read(tmp_path):
    """Without --force, a command whose --out exists stops at once: the dataset (mnist without --root) and
    the model (a missing file) that it would read next would fail with another message."""
    runner = CliRunner()
    stem = tmp_path / "cnn"
    stem.with_suffix(".pt").write_bytes(b"")
    missing = str(tmp_path / "no-model")
    for args in (["train", "--dataset", "mnist"],
                 ["retrofit", "--dataset", "mnist", "--model", missing, "--activation", "jumprelu"],
                 ["gred", "--dataset", "mnist", "--model", missing]):
        result = runner.invoke(main, [*args, "--out", str(stem)])
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith(f"Error: refusing to overwrite existing file(s): {stem.with_suffix('.pt')}"), \
            (args, result.output)
