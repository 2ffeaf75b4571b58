"""Throughput of supporting scores: the closed form beside batched autograd, same network and rows.

    python bench/explain.py [--classes 1000] [--hidden 10000] [--rows 4096] [--batch 1024] [--repeats 3]

Both paths of `logitguard.explain.supporting_scores` on a random-init corrector-shaped network
(C → D → C) and synthetic logits with random labels: the closed form ((W2[i] − mean W2) ⊙ m) @ W1
(two matrix products per batch: the hidden pre-activations and the masked product) and the generic
vector-Jacobian product (forward and backward: four). Prints rows/s of each, their speed ratio
(target >= 3x) and the largest absolute difference between the two score matrices.

Wall-clock after a warm-up; the best of `--repeats` runs counts. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import best_time, untrained_corrector  # noqa: E402

from logitguard.explain import supporting_scores  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    c, d, n = args.classes, args.hidden, args.rows
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; C={c}, D={d}, rows={n}, batch={args.batch}")

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(n, c)).astype(np.float32)
    labels = rng.integers(0, c, n)
    corrector = untrained_corrector(c, d)
    results = {}

    def run(method: str) -> None:
        results[method] = supporting_scores(corrector, logits, labels, method=method, batch_size=args.batch)

    times = {method: best_time(lambda: run(method), args.repeats) for method in ("closed_form", "autograd")}
    for method, seconds in times.items():
        print(f"  {method:12s} {n / seconds:9.0f} rows/s")
    print(f"  ratio closed_form/autograd {times['autograd'] / times['closed_form']:5.2f}x   (target >= 3)")
    diff = np.abs(results["closed_form"] - results["autograd"]).max()
    scale = np.abs(results["autograd"]).max()
    print(f"  max |closed_form - autograd| {diff:.2e}  (largest |S| {scale:.2e})")


if __name__ == "__main__":
    main()
