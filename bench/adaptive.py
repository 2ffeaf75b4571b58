"""Adaptive attacks: images/s per attack, the sequenced suite against every attack on every sample, convergence.

    python bench/adaptive.py [--n 64] [--steps 20] [--restarts 1] [--eot 1] [--eps 16/255]
                             [--pipelines ln-reject,ln-agree|all] [--judge-draws 5] [--device cpu|cuda]

Loads the embedded model (``data/fashion-mnist-cnn``) and the saved shipped pipelines
(``data/defenses/defenses.json``) and attacks the first `n` test images of the embedded table's selection
through each pipeline. Per pipeline it prints:

- every attack of the suite's default sequence run on every sample: images/s and robust accuracy;
- their per-sample worst case and total seconds, against the sequenced ``suite`` (each attack only on the
  samples still robust): the same worst case should come for a fraction of the compute (ratio printed);
- the convergence check: the suite again with 2x steps, 2x restarts and 2x EOT draws; the worst case over
  the default run and each rerun should move by at most 1 point.

Robust = right or rejected on every one of ``--judge-draws`` fresh noise draws (exact mirror decisions).
The defaults run in a few minutes on 2 CPU cores; scale up with the flags. Figures only: nothing is asserted.
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

from logitguard.defenses.decision import ABSTAIN  # noqa: E402
from logitguard.defenses.pipelines import load_pipelines  # noqa: E402
from logitguard.tables import read_table  # noqa: E402
from producers.attacks import make_attack  # noqa: E402
from producers.attacks.sequence import default_sequence  # noqa: E402
from producers.data.datasets import load_dataset  # noqa: E402
from producers.data.noise import NoiseRecipe  # noqa: E402
from producers.export.logits import select_samples  # noqa: E402
from producers.models.classifiers import load_model  # noqa: E402
from producers.threat.pipeline import load_pipeline_mirror  # noqa: E402


def broken(attack, adv, y, draws: int, seed: int = 123) -> torch.Tensor:
    """(n,) bool: wrong and not abstained on at least one of `draws` fresh draws (fixed judge seed)."""
    g = torch.Generator(device=adv.device).manual_seed(seed)
    final = attack.decide(adv, g, draws)
    return ((final != y) & (final != ABSTAIN)).any(dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--eot", type=int, default=1)
    parser.add_argument("--eps", default="16/255")
    parser.add_argument("--judge-draws", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--pipelines", default="ln-reject,ln-agree", help="comma-separated, or 'all'")
    parser.add_argument("--no-convergence", action="store_true")
    args = parser.parse_args()
    eps = float(Fraction(args.eps))
    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model = load_model(ROOT / "data" / "fashion-mnist-cnn", device=device).eval()
    specs = load_pipelines(ROOT / "data" / "defenses" / "defenses.json")
    if args.pipelines != "all":
        specs = {k: specs[k] for k in args.pipelines.split(",")}
    meta = read_table(ROOT / "data" / "fashion-mnist", split="test", attacks=["clean"], columns=[]).metadata
    recipe = NoiseRecipe(tuple((q["kind"], q["scale"]) for q in meta["noise"]["recipe"]))
    test = load_dataset("fashion-mnist", "test")
    idx = np.sort(select_samples(len(test), args.n, 0, "test"))
    x, y = test.load(idx).to(device), torch.as_tensor(test.labels[idx]).to(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), n={len(x)}, "
          f"eps={args.eps}, steps={args.steps}, restarts={args.restarts}, eot={args.eot}, "
          f"judge draws={args.judge_draws}")
    print("threat model: adaptive; robust = right or rejected on every judge draw, on all n samples")
    summary = []
    for name, spec in specs.items():
        mirror = load_pipeline_mirror(spec)

        def run(attack: str, seed: int = 0, **over):
            params = {**dict(steps=args.steps, restarts=args.restarts, eot=args.eot), **over}
            a = make_attack(attack, model, defense=mirror, noise=recipe, eps=eps, batch_size=args.batch_size,
                            device=device, **params)
            g = torch.Generator(device=device).manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            adv = a(x, y, generator=g).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return a, adv, time.perf_counter() - start

        print(f"\n{'pipeline':12} {'attack':16} {'images/s':>9} {'seconds':>8} {'robust':>8}")
        every, total, judge = torch.zeros(len(x), dtype=torch.bool, device=device), 0.0, None
        for attack in default_sequence(mirror):
            judge, adv, seconds = run(attack)
            hit = broken(judge, adv, y, args.judge_draws)
            every |= hit
            total += seconds
            robust = 100 * (1 - hit.float().mean())
            print(f"{name:12} {attack:16} {len(x) / seconds:9.1f} {seconds:8.1f} {robust:7.1f}%", flush=True)
        suite, adv, seconds = run("suite")
        worst = broken(judge, adv, y, args.judge_draws)
        line = {"pipeline": name, "every": 1 - every.float().mean().item(), "suite": 1 - worst.float().mean().item(),
                "ratio": seconds / total}
        print(f"{name:12} {'every attack':16} {len(x) / total:9.1f} {total:8.1f} {100 * line['every']:7.1f}%")
        print(f"{name:12} {'suite':16} {len(x) / seconds:9.1f} {seconds:8.1f} {100 * line['suite']:7.1f}%  "
              f"(compute {line['ratio']:.2f}x of every attack; broken by: "
              f"{dict(zip(suite.names, [r['claimed'] for r in suite.record()['indicators']]))})", flush=True)
        if not args.no_convergence:
            for label, over in (("2x steps", {"steps": 2 * args.steps}),
                                ("2x restarts", {"restarts": 2 * args.restarts}), ("2x eot", {"eot": 2 * args.eot})):
                _, more, _ = run("suite", seed=1, **over)
                line[label] = 1 - (worst | broken(judge, more, y, args.judge_draws)).float().mean().item()
                print(f"{name:12} {'suite + ' + label:16} {'':>9} {'':>8} {100 * line[label]:7.1f}%", flush=True)
        summary.append(line)
    print(f"\n{'pipeline':12} {'every':>7} {'suite':>7} {'compute':>8}" +
          ("" if args.no_convergence else f" {'2x steps':>9} {'2x rest.':>9} {'2x eot':>7} {'max move':>9}"))
    for r in summary:
        text = f"{r['pipeline']:12} {100 * r['every']:6.1f}% {100 * r['suite']:6.1f}% {r['ratio']:7.2f}x"
        if not args.no_convergence:
            moves = [r["suite"] - r[k] for k in ("2x steps", "2x restarts", "2x eot")]
            text += (f" {100 * r['2x steps']:8.1f}% {100 * r['2x restarts']:8.1f}% {100 * r['2x eot']:6.1f}% "
                     f"{100 * max(moves):7.1f}pt{'' if max(moves) <= 0.01 else '  (> 1 point: not converged)'}")
        print(text)


if __name__ == "__main__":
    main()
