"""Rows per second of the NumPy apply path of each shipped pipeline (data/defenses/defenses.json).

Each pipeline is built from its files and applied (`GatedDefense.check_table`) to the embedded
Fashion-MNIST test rows (clean and every attack, with their noise queries). The best of `--repeats`
timed calls after one warm-up is reported. The script also says whether torch was imported: the
NumPy path must not need it.

    python bench/numpy_path.py [--repeats 5] [--rows N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy as np  # noqa: E402

from logitguard import read_table  # noqa: E402
from logitguard.defenses.pipelines import load_pipelines  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=None, help="use the first N test rows (default: all)")
    args = parser.parse_args()
    table = read_table(ROOT / "data" / "fashion-mnist", split="test")
    if args.rows is not None:
        table = table.take(np.arange(min(args.rows, len(table))))
    specs = load_pipelines(ROOT / "data" / "defenses" / "defenses.json")
    print(f"rows: {len(table)}, classes: {table.num_classes}, repeats: {args.repeats}")
    print(f"{'pipeline':<14} {'rows/s':>12} {'ms/call':>10}")
    for name, spec in specs.items():
        defense = spec.build()
        defense.check_table(table)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            defense.check_table(table)
            best = min(best, time.perf_counter() - start)
        print(f"{name:<14} {len(table) / best:>12,.0f} {1e3 * best:>10.1f}")
    print(f"torch imported: {'torch' in sys.modules}")


if __name__ == "__main__":
    main()
