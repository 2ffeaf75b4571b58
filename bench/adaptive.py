"""Adaptive attacks: images/s per attack and pipeline, and the convergence check.

    python bench/adaptive.py [--n 256] [--device cpu|cuda] [--steps 100] [--eps 16/255] [--pipelines a,b]

Loads the embedded model (``data/fashion-mnist-cnn``) and the saved shipped pipelines
(``data/defenses/defenses.json``), attacks the first `n` test images of the embedded table's selection
through each pipeline, and prints per (pipeline, attack) the images per second and the pipeline's robust
accuracy on them (judged by the exact mirror on one fresh noise draw per row, the way the real defense
sees an exported row). The convergence check reruns the per-sample worst case over the attacks with
twice the steps and with twice the restarts: the defaults are strong enough when neither moves robust
accuracy by more than 1 point. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from logitguard.defenses.pipelines import load_pipelines  # noqa: E402
from logitguard.tables import read_table  # noqa: E402
from producers.attacks import make_attack  # noqa: E402
from producers.data.datasets import load_dataset  # noqa: E402
from producers.export.logits import select_samples  # noqa: E402
from producers.models.classifiers import load_model  # noqa: E402
from producers.data.noise import NoiseRecipe  # noqa: E402
from producers.threat.export import BARE_ATTACKS, DEFAULT_ATTACKS  # noqa: E402
from producers.threat.mirrors import load_pipeline_mirror  # noqa: E402


def robust(attack, x, y, advs, generator) -> float:
    """Share of samples the pipeline gets right (or rightly rejects) under every one of `advs`."""
    ok = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for adv in advs:
        ok &= ~attack.succeeded(adv, y, generator)
    return ok.float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--eps", default="16/255")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--pipelines", default=None, help="comma-separated (default: all shipped)")
    parser.add_argument("--no-convergence", action="store_true")
    args = parser.parse_args()
    eps = float(Fraction(args.eps))
    device = torch.device(args.device)

    model = load_model(ROOT / "data" / "fashion-mnist-cnn", device=device).eval()
    specs = load_pipelines(ROOT / "data" / "defenses" / "defenses.json")
    if args.pipelines:
        specs = {k: specs[k] for k in args.pipelines.split(",")}
    meta = read_table(ROOT / "data" / "fashion-mnist", split="test", attacks=["clean"], columns=[]).metadata
    recipe = NoiseRecipe(tuple((q["kind"], q["scale"]) for q in meta["noise"]["recipe"]))
    test = load_dataset("fashion-mnist", "test")
    idx = np.sort(select_samples(len(test), args.n, 0, "test"))
    x, y = test.load(idx).to(device), torch.as_tensor(test.labels[idx]).to(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), n={len(x)}, "
          f"eps={args.eps}, steps={args.steps}, restarts={args.restarts}")
    print("threat model: adaptive (each attack is aimed at the pipeline it is printed beside); robust = right "
          "or rejected, on all n samples")
    print(f"{'pipeline':14} {'attack':14} {'images/s':>9} {'robust':>8}")
    rows = []
    for name, spec in specs.items():
        mirror = load_pipeline_mirror(spec)
        bare = spec.detector is None and spec.corrector is None
        attacks = BARE_ATTACKS if bare else DEFAULT_ATTACKS

        def run(steps: int, restarts: int, attack: str, seed: int = 0):
            a = make_attack(attack, model, defense=mirror, noise=recipe, eps=eps, steps=steps, restarts=restarts,
                            batch_size=args.batch_size, device=device)
            g = torch.Generator(device=device).manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            adv = a(x, y, generator=g).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return a, adv, len(x) / (time.perf_counter() - start)

        advs, judge = [], None
        for attack in attacks:
            judge, adv, rate = run(args.steps, args.restarts, attack)
            advs.append(adv)
            g = torch.Generator(device=device).manual_seed(123)
            print(f"{name:14} {attack:14} {rate:9.0f} {100 * robust(judge, x, y, [adv], g):7.1f}%", flush=True)
        g = torch.Generator(device=device).manual_seed(123)
        worst = robust(judge, x, y, advs, g)
        line = {"pipeline": name, "worst": worst}
        if not args.no_convergence:
            for label, steps, restarts in (("2x steps", 2 * args.steps, args.restarts),
                                           ("2x restarts", args.steps, 2 * args.restarts)):
                more = [run(steps, restarts, attack, seed=1)[1] for attack in attacks]
                g = torch.Generator(device=device).manual_seed(123)
                line[label] = robust(judge, x, y, advs + more, g)
        rows.append(line)
        print(f"{name:14} {'worst case':14} {'':>9} {100 * worst:7.1f}%", flush=True)
        if not args.no_convergence:
            print(f"{name:14} {'+2x steps':14} {'':>9} {100 * line['2x steps']:7.1f}%", flush=True)
            print(f"{name:14} {'+2x restarts':14} {'':>9} {100 * line['2x restarts']:7.1f}%", flush=True)
    if not args.no_convergence:
        print("\nconvergence: worst case with the defaults, then adding attacks at 2x steps / 2x restarts")
        print(f"{'pipeline':14} {'default':>8} {'2x steps':>9} {'2x restarts':>12} {'max move':>9}")
        for r in rows:
            move = max(r["worst"] - r["2x steps"], r["worst"] - r["2x restarts"])
            print(f"{r['pipeline']:14} {100 * r['worst']:7.1f}% {100 * r['2x steps']:8.1f}% "
                  f"{100 * r['2x restarts']:11.1f}% {100 * move:8.1f}pt")


if __name__ == "__main__":
    main()
