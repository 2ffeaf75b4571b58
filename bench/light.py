"""The light apply side: start-up cost of the CLI, and the NumPy corrector forward beside torch's.

    python bench/light.py [--runs 7] [--ref daa2bcc] [--rows 20000] [--classes 10] [--hidden 10000]

Figures (nothing is asserted):

1. ``logitguard --help`` wall time, median and min of `--runs` fresh interpreters, for this tree and, with
   ``--ref REV``, for that git revision's ``logitguard/`` (extracted with ``git archive`` into a temporary
   directory): the before/after of moving torch, scikit-learn and pandas off the CLI's import path.
   Beside it a bare ``python -c pass``, the floor. Also which heavy modules ``import logitguard.cli`` loads.
2. A corrector's forward on the CPU (C=`--classes`, D=`--hidden`, `--rows` rows): the NumPy path that a loaded
   corrector takes, and the torch module's (what a freshly trained one runs), rows/s, and their largest
   absolute difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
HELP = "import sys; sys.argv = ['logitguard', '--help']; from logitguard.cli import main; main()"
HEAVY = ("torch", "sklearn", "scipy", "pandas", "pyarrow")


def wall(code: str, root: Path, runs: int) -> tuple[float, float]:
    """Median and min wall seconds of `python -c code` run in `root` (so its ``logitguard/`` is imported)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def heavy_modules(root: Path) -> str:
    code = f"import sys, logitguard.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True, capture_output=True,
                          text=True).stdout.strip()


def startup(runs: int, ref: str | None) -> None:
    median, best = wall("pass", REPO, runs)
    print(f"python -c pass              : median {median:.3f} s, min {best:.3f} s")
    trees = [("this tree", REPO)]
    with tempfile.TemporaryDirectory() as tmp:
        if ref:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "logitguard"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees.append((f"at {ref}", Path(tmp)))
        for name, root in trees:
            median, best = wall(HELP, root, runs)
            print(f"logitguard --help, {name:<9}: median {median:.3f} s, min {best:.3f} s; "
                  f"import logitguard.cli loads: {heavy_modules(root)}")


def forward(rows: int, c: int, hidden: int) -> None:
    import torch

    from logitguard.defenses.corrector import LogitCorrector

    rng = np.random.default_rng(0)
    corrector = LogitCorrector(hidden=hidden, progress=False)
    corrector._restore({"n_classes": c, "class_names": None, "attacks": [], "history": [], "best_epoch": 0}, {
        "0.weight": rng.normal(0, c ** -0.5, (hidden, c)), "0.bias": rng.normal(0, 0.1, hidden),
        "3.weight": rng.normal(0, hidden ** -0.5, (c, hidden)), "3.bias": rng.normal(0, 0.1, c)})
    logits = rng.normal(0, 5, (rows, c)).astype(np.float32)
    results = {}
    for name in ("numpy", "torch"):
        if name == "torch":
            corrector.model_  # builds the module: from now on correct() runs torch
        corrector.correct(logits[:1000])  # warm up
        start = time.perf_counter()
        results[name] = corrector.correct(logits)
        seconds = time.perf_counter() - start
        print(f"corrector forward, {name:<5}: {rows / seconds:>12,.0f} rows/s (C={c}, D={hidden}, "
              f"{rows} rows, {torch.get_num_threads()} torch threads)")
    print(f"largest |numpy - torch|     : {np.abs(results['numpy'] - results['torch']).max():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ref", default=None, help="a git revision to compare --help against")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=10000)
    args = parser.parse_args()
    startup(args.runs, args.ref)
    forward(args.rows, args.classes, args.hidden)


if __name__ == "__main__":
    main()
