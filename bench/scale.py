"""Local vs Ray engine: wall seconds and rows/s of `correct`, `defend` and `detect` on one synthetic table.

    python bench/scale.py [--rows 200000] [--classes 100] [--queries 4] [--workers 2]

Each command runs as its own process, as a user runs it, so the Ray figures include starting a local Ray
(or connecting to RAY_ADDRESS) and the actors. The outputs of both engines are compared row for row. The
corrector has random weights (inference cost does not depend on training); the detector is learned-noisy,
fitted on the training rows of 2,500 samples. Peak RSS is the driver process's (Ray's workers are not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import untrained_corrector  # noqa: E402

from logitguard import LogitTable, read_table, write_table  # noqa: E402
from logitguard.defenses.detectors import make_detector  # noqa: E402


def synthetic(rows: int, classes: int, queries: int, seed: int = 0) -> LogitTable:
    """Half clean, half "pgd" rows of the same samples; a tenth of the samples in train."""
    rng = np.random.default_rng(seed)
    n = rows // 2
    labels = rng.integers(0, classes, n)
    clean = rng.normal(0, 1, (n, classes)).astype(np.float32)
    clean[np.arange(n), labels] += 3
    attacked = clean + rng.normal(0, 2, clean.shape).astype(np.float32)
    logits = np.concatenate([clean, attacked])
    noisy = logits[:, None, :] + rng.normal(0, 0.5, (2 * n, queries, classes)).astype(np.float32)
    split = np.where(np.arange(n) < n // 10, "train", "test")
    return LogitTable.from_arrays(logits=logits, noisy_logits=noisy, sample_id=np.tile(np.arange(n), 2),
                                  split=np.tile(split, 2), attack=["clean"] * n + ["pgd"] * n,
                                  label=np.tile(labels, 2), metadata={"attacks": {"pgd": {"eps": 0.03}}})


def timed(args: list[str]) -> tuple[float, int | None, dict]:
    """Wall seconds, the driver's peak RSS in MiB (where /usr/bin/time exists) and the JSON report of one
    command."""
    prefix = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    done = subprocess.run([*prefix, sys.executable, "-c", "from logitguard.cli import main; main()", *args],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    rss = int(done.stderr.strip().splitlines()[-1]) // 1024 if prefix else None
    report = json.loads(done.stdout)
    report.pop("written", None)
    return seconds, rss, report


def same(a: Path, b: Path) -> bool:
    x, y = read_table(a), read_table(b)
    ox, oy = np.lexsort((x.sample_id, x.attack, x.split)), np.lexsort((y.sample_id, y.attack, y.split))
    return x.metadata == y.metadata and all(x.arrow.column(c).take(ox).equals(y.arrow.column(c).take(oy))
                                            for c in x.columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        table = synthetic(options.rows, options.classes, options.queries)
        write_table(table, work / "table", partition_by=("split", "attack"))
        corrector = untrained_corrector(options.classes, 256)
        corrector.history_, corrector.best_epoch_ = [], 0
        corrector.save(work / "corrector.npz")
        train = table.select(split="train")
        make_detector("learned-noisy", fpr=0.05).fit_table(train.take(train.sample_id < 2500)).save(work / "detector.npz")
        size = sum(f.stat().st_size for f in (work / "table").rglob("*.parquet")) / 2**20
        print(f"{options.rows:,} rows x {options.classes} classes, K={options.queries} ({size:.0f} MiB of Parquet); "
              f"{os.cpu_count()} CPUs; Ray --workers {options.workers}")
        commands = {
            "correct": ["correct", work / "table", "--corrector", work / "corrector.npz"],
            "defend": ["defend", work / "table", "--detector", work / "detector.npz", "--corrector",
                       work / "corrector.npz", "--on-flag", "agree"],
            "detect": ["detect", work / "table", "--detector", work / "detector.npz", "--split", "test"],
        }
        print(f"{'command':<8} {'engine':<6} {'seconds':>8} {'rows/s':>9} {'peak RSS':>9}  same output")
        for name, args in commands.items():
            outputs, reports = {}, {}
            for engine in ("local", "ray"):
                extra = ["--engine", engine] + (["--workers", str(options.workers)] if engine == "ray" else [])
                out = work / f"{name}-{engine}"
                if name != "detect":
                    extra += ["--out", str(out)]
                seconds, rss, reports[engine] = timed([*map(str, args), *extra, "--json"])
                outputs[engine] = out
                rows = options.rows if name != "detect" else int(options.rows * 0.9)
                verdict = ""
                if engine == "ray":
                    equal = reports["ray"] == reports["local"]
                    if name != "detect":
                        equal = equal and same(outputs["ray"], outputs["local"])
                    verdict = "yes (rows, metadata, report)" if equal else "NO"
                print(f"{name:<8} {engine:<6} {seconds:8.1f} {rows / seconds:9,.0f} "
                      f"{'-' if rss is None else f'{rss:,} MiB':>9}  {verdict}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
