"""Outputs are all-or-nothing and exclusive, damaged pages are refused, files honour the umask, killed runs
leave nothing the next run trips on, and a bad output location is an `Error:` before any work.

Kills are real (SIGKILL) in a small subprocess, at a chosen point of the write (the writer is patched to
kill its own process there); concurrency is a subprocess holding the target while this process tries it.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from logitguard import TableError, read_table, write_table
from logitguard.files import transactions
from logitguard.cli import main
from logitguard.defenses.detectors import make_detector

ROOT = Path(__file__).resolve().parents[1]
KEY = ["split", "attack", "sample_id"]


def _python(code: str, *args: str, wait: bool = True):
    """Run `code` in a fresh interpreter (this checkout importable); returns the CompletedProcess or Popen."""
    command = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _frame(path) -> dict:
    """A table as sorted plain arrays, to compare two tables row for row."""
    table = read_table(path)
    order = np.lexsort((table.sample_id, table.attack, table.split))
    return {"key": [tuple(r) for r in zip(table.split[order], table.attack[order], table.sample_id[order])],
            "logits": table.logits[order], "labels": table.labels[order]}


def _same(a: dict, b: dict) -> bool:
    return a["key"] == b["key"] and np.array_equal(a["logits"], b["logits"]) and np.array_equal(a["labels"], b["labels"])


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# A partitioned write that kills its own process (SIGKILL) as it starts writing file number argv[3].
KILL_WHILE_WRITING = """
    import os, signal, sys
    from logitguard import tables
    from logitguard.tables import write as writer  # where write_table finds write_parquet
    real, calls = writer.write_parquet, []
    def dying(arrow, target):
        calls.append(target)
        if len(calls) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        real(arrow, target)
    writer.write_parquet = dying
    tables.write_table(tables.read_table(sys.argv[1]), sys.argv[2], partition_by=("split", "attack"), overwrite=True)
"""


@pytest.fixture()
def source(digits_split_table, tmp_path):
    """The digits table as one file (6 partitions when written by split and attack)."""
    path = tmp_path / "source.parquet"
    write_table(digits_split_table, path)
    return path


def test_a_killed_directory_write_leaves_the_old_output_or_nothing(source, digits_split_table, tmp_path):
    # Into a new directory: killed at the third of six files, nothing appears under the target.
    target = tmp_path / "new"
    run = _python(KILL_WHILE_WRITING, source, target, 3)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not target.exists()
    assert any(".new.stage-" in name for name in _hidden(tmp_path))  # the dead run's staging directory
    # Into an earlier output with --force: killed mid-way, the old table is intact, row for row.
    old = tmp_path / "old"
    write_table(digits_split_table.select(attacks=["clean", "fgsm"]), old, partition_by=("split", "attack"))
    before = _frame(old)
    assert _python(KILL_WHILE_WRITING, source, old, 4).returncode == -signal.SIGKILL
    assert _same(_frame(old), before)
    # The next run to each target removes what the dead runs left and writes normally.
    write_table(digits_split_table, target, partition_by=("split", "attack"))
    assert _same(_frame(target), _frame(source))
    assert not any(".new." in name for name in _hidden(tmp_path))
    write_table(digits_split_table.select(attacks="clean"), old, partition_by=("split", "attack"), overwrite=True)
    # --force replaced the whole old output: no partition of the earlier run survives.
    assert sorted(p.name for p in old.glob("split=*/attack=*")) == ["attack=clean", "attack=clean"]
    assert read_table(old).attacks == ["clean"]
    assert _hidden(tmp_path) == []


def test_a_commit_killed_between_its_two_renames_is_undone(source, digits_split_table, tmp_path):
    """Where no atomic directory exchange exists, the old output is renamed aside first; a run killed right
    then leaves no table at the target for a moment, and the next run to it puts the old one back."""
    old = tmp_path / "old"
    write_table(digits_split_table.select(attacks="clean"), old, partition_by=("split", "attack"))
    before = _frame(old)
    code = """
        import os, signal, sys
        from logitguard import tables
        from logitguard.files import staging
        staging._exchange = lambda a, b: False
        real = os.rename
        def rename(src, dst):
            if ".commit-" in str(src):
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        staging.os.rename = rename
        tables.write_table(tables.read_table(sys.argv[1]), sys.argv[2], partition_by=("split", "attack"), overwrite=True)
    """
    assert _python(code, source, old).returncode == -signal.SIGKILL
    assert not old.exists() and any(".old.old-" in name for name in _hidden(tmp_path))
    with transactions.OutputLock(old):  # what every writer to `old` does first
        pass
    assert _same(_frame(old), before)
    assert _hidden(tmp_path) == []


def test_two_runs_to_one_target_one_writes_the_other_refuses(source, digits_split_table, tmp_path):
    target = tmp_path / "out"
    ready, go = tmp_path / "ready", tmp_path / "go"
    holder = _python("""
        import sys, time
        from pathlib import Path
        from logitguard import tables
        from logitguard.tables import write as writer
        real = writer.write_parquet
        def slow(arrow, target):
            Path(sys.argv[3]).touch()
            while not Path(sys.argv[4]).exists():
                time.sleep(0.02)
            real(arrow, target)
        writer.write_parquet = slow
        tables.write_table(tables.read_table(sys.argv[1]), sys.argv[2], partition_by=("split", "attack"))
    """, source, target, ready, go, wait=False)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), holder.communicate()
        with pytest.raises(TableError, match=r"another run is writing .*out \(process \d+\)"):
            write_table(digits_split_table.select(attacks="clean"), target, partition_by=("split", "attack"),
                        overwrite=True)
        # The CLI refuses before it opens its inputs (the detector file does not even exist).
        result = CliRunner().invoke(main, ["defend", str(source), "--detector", str(tmp_path / "none.npz"),
                                           "--on-flag", "reject", "--out", str(target), "--force"])
        assert result.exit_code == 1 and result.output.startswith("Error: another run is writing")
    finally:
        go.touch()
        _, err = holder.communicate(timeout=60)
    assert holder.returncode == 0, err
    assert _same(_frame(target), _frame(source))  # the holder's table, whole


def test_force_never_replaces_a_directory_that_is_not_a_table(digits_split_table, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(TableError, match="holds files that are not part of a table"):
        write_table(digits_split_table, target, partition_by=("split", "attack"), overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"
    assert _hidden(tmp_path) == []


def _flip_inside_a_data_page(path: Path, column: str) -> None:
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    chunk = meta.row_group(0).column(names.index(column))
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[middle] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_damaged_data_page_is_an_error_not_other_logits(digits_table, tmp_path):
    path = tmp_path / "t.parquet"
    write_table(digits_table, path)
    _flip_inside_a_data_page(path, "logits.list.element")
    assert pq.ParquetFile(path).metadata.num_rows == len(digits_table)  # the footer is intact
    with pytest.raises(TableError, match="a data page is damaged"):
        read_table(path)
    directory = tmp_path / "ds"
    files = write_table(digits_table, directory, partition_by=("split", "attack"))
    _flip_inside_a_data_page(files[-1], "logits.list.element")
    result = CliRunner().invoke(main, ["inspect", str(directory)])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {directory}: a data page is damaged")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=oct)
def test_outputs_honour_the_umask(umask, digits_table, tmp_path):
    old = os.umask(umask)
    try:
        file = write_table(digits_table, tmp_path / "t.parquet")[0]
        files = write_table(digits_table, tmp_path / "ds", partition_by=("split", "attack"))
        saved = make_detector("msp").fit(digits_table.logits).save(tmp_path / "d.npz")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for path in (file, *files, saved):
        assert mode(path) == 0o666 & ~umask, path
    for directory in (tmp_path / "ds", files[0].parent, files[0].parent.parent):
        assert mode(directory) == 0o777 & ~umask, directory


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporary_files_of_dead_runs_are_removed_by_the_next_run(digits_table, tmp_path):
    host = transactions._host()
    dead = _dead_pid()
    stale_file = tmp_path / f".t.parquet.tmp-{dead}-{host}-k1ll3d"
    stale_dir = tmp_path / f".ds.stage-{dead}-{host}-k1ll3d"
    live = tmp_path / f".t.parquet.tmp-{os.getpid()}-{host}-l1v3"  # a run still going: left alone
    other = tmp_path / ".t.parquet.tmp-12-nothost-x"  # not our naming: left alone
    stale_file.write_bytes(b"PAR1 half a file")
    (stale_dir / "split=test").mkdir(parents=True)
    live.write_bytes(b"")
    other.write_bytes(b"")
    write_table(digits_table, tmp_path / "t.parquet")
    write_table(digits_table, tmp_path / "ds", partition_by=("split", "attack"))
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists()
    assert _hidden(tmp_path) == sorted([live.name, other.name])  # no lock or staging left either


def test_same_inputs_give_byte_identical_outputs(digits_split_table, tmp_path):
    a = write_table(digits_split_table, tmp_path / "a", partition_by=("split", "attack"))
    b = write_table(digits_split_table, tmp_path / "b", partition_by=("split", "attack"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert write_table(digits_split_table, tmp_path / "a.parquet")[0].read_bytes() == \
        write_table(digits_split_table, tmp_path / "b.parquet")[0].read_bytes()
    from logitguard.defenses.corrector import LogitCorrector

    train = digits_split_table.select(split="train")
    clean, attacked = train.select(attacks="clean"), train.select(attacks="fgsm")
    saved = []
    for name in ("c1", "c2"):
        corrector = LogitCorrector(hidden=16, epochs=2, seed=3, progress=False)
        corrector.fit(clean.logits, attacked.logits, clean.labels)
        saved.append(corrector.save(tmp_path / f"{name}.npz").read_bytes())
    assert saved[0] == saved[1]
    detectors = [make_detector("learned", seed=1).fit(train.logits, train.attack != "clean").save(
        tmp_path / f"d{i}.npz").read_bytes() for i in range(2)]
    assert detectors[0] == detectors[1]
    with zipfile.ZipFile(tmp_path / "c1.npz") as archive:  # no clock in the archive
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


# -- bad output locations: a clear Error: before any work ------------------------------------------------


@pytest.fixture()
def table_file(digits_split_table, tmp_path):
    path = tmp_path / "table.parquet"
    write_table(digits_split_table, path)
    return path


def test_an_output_under_a_regular_file_fails_before_training(table_file, tmp_path, monkeypatch):
    from logitguard.defenses.corrector import LogitCorrector

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(LogitCorrector, "fit_table", never)
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    for args in (["train-corrector", str(table_file), "--attacks", "fgsm", "--out", f"{blocker}/sub/c.npz"],
                 ["fit-detector", str(table_file), "--kind", "msp", "--out", f"{blocker}/d.npz"],
                 ["correct", str(table_file), "--corrector", "none.npz", "--out", f"{blocker}/dir"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert result.output == f"Error: cannot write {args[-1]}: {blocker} is a file, not a directory\n"


def _read_only_directory(tmp_path: Path) -> Path:
    """A directory this process cannot create files in, even as root (sysfs) when running as root."""
    if os.geteuid() != 0:
        path = tmp_path / "read-only"
        path.mkdir()
        path.chmod(0o555)
        return path
    candidate = Path("/sys/kernel")
    try:
        fd, probe = __import__("tempfile").mkstemp(dir=candidate)
    except OSError:
        return candidate
    os.close(fd)
    os.unlink(probe)
    pytest.skip("no read-only directory to test with")


def test_a_read_only_location_fails_before_work(table_file, tmp_path):
    where = _read_only_directory(tmp_path)
    result = CliRunner().invoke(main, ["fit-detector", str(table_file), "--kind", "msp",
                                       "--out", str(where / "d.npz")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot write {where / 'd.npz'}: {where} is not writable (")


def test_an_os_error_while_writing_is_an_error_line_and_leaves_nothing(table_file, tmp_path, monkeypatch):
    from logitguard.tables import write as table_writer

    detector = tmp_path / "msp.npz"
    assert CliRunner().invoke(main, ["fit-detector", str(table_file), "--kind", "msp", "--out",
                                     str(detector)]).exit_code == 0

    def full(target, *_):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(table_writer, "write_parquet", lambda arrow, target: full(target))
    monkeypatch.setattr(table_writer, "_open_writer", full)  # the streamed writer of defend, correct, guard apply
    out = tmp_path / "defended"
    result = CliRunner().invoke(main, ["defend", str(table_file), "--detector", str(detector), "--on-flag", "reject",
                                       "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: No space left on device: '") and "Traceback" not in result.output
    assert not out.exists() and _hidden(tmp_path) == []


def test_bad_values_are_refused_up_front(table_file):
    result = CliRunner().invoke(main, ["sweep-p-clean", str(table_file), "--attacks", "fgsm", "--values", ""])
    assert result.exit_code == 2 and "give at least one p_clean value" in result.output
