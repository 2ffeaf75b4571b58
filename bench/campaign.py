"""Campaign watch against the query tier: queries until the alarm, attacks caught, benign false alarms, cost.

    python bench/campaign.py [--samples 30] [--budget 1000] [--eps 8/255] [--pipeline none]
                             [--window 1000] [--neighbours 4] [--min-queries 25] [--fpr 1e-3]

Runs Square (scores) and RayS (labels) from producers/attacks against the embedded Fashion-MNIST CNN
(``data/fashion-mnist-cnn``) through a shipped pipeline's mirror (default ``none``: the bare model), one image
at a time, and records the model's logits for EVERY query the attack makes (a recording module around the
model's forward; the noise queries of a noise-reading pipeline are not recorded: a client sends them beside
its logits). Each attack's stream goes to a fresh client of a `CampaignWatch` calibrated on the table's
*train* clean logits; benign streams come from the *test* split: its clean rows in random order, the same
images under light augmentations (five variants each: shifts of 1-2 px, brightness x0.85-1.15, in a row), and
bursts of one class. An attack succeeds at the first query within eps whose answer is a wrong label (the
attack's own count; on the bare model the first query within eps where the model's label changes: RayS's
line search changes the label earlier, at radii beyond eps, which is no success). Only correctly classified
images are attacked. An attack is caught when the alarm comes no later than its success query (the service
can withhold that answer). Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from logitguard.defenses.pipelines import load_pipelines  # noqa: E402
from logitguard.evaluation.intervals import binomial_interval  # noqa: E402
from logitguard.serve.campaign import CampaignWatch  # noqa: E402
from logitguard.tables import read_table  # noqa: E402
from producers.attacks import make_attack  # noqa: E402
from producers.data.datasets import load_dataset  # noqa: E402
from producers.data.noise import NoiseRecipe  # noqa: E402
from producers.models.classifiers import load_model  # noqa: E402
from producers.threat.pipeline import load_pipeline_mirror  # noqa: E402


class Recorder(nn.Module):
    """The model, recording the logits of every forward call of one image (one query of a batch-1 attack)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if len(x) == 1:
            self.rows.append(out.detach().float().cpu().numpy())
        return out

    def take(self) -> np.ndarray:
        rows, self.rows = self.rows, []
        return np.concatenate(rows) if rows else np.zeros((0, 10), np.float32)


def first(mask: np.ndarray) -> int | None:
    """1-based index of the first true entry, None when none."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) + 1 if len(hits) else None


def augment(x: torch.Tensor, rng: np.random.Generator, variants: int) -> torch.Tensor:
    """(B * variants, 1, H, W): each image shifted by up to 2 px and scaled in brightness, variants in a row."""
    out = []
    for image in x:
        for _ in range(variants):
            dy, dx = rng.integers(-2, 3, size=2)
            shifted = torch.roll(image, shifts=(int(dy), int(dx)), dims=(1, 2))
            out.append((shifted * float(rng.uniform(0.85, 1.15))).clamp(0, 1))
    return torch.stack(out)


def interval(k: int, n: int) -> str:
    """k / n as a percentage with its 95% interval (the project's `binomial_interval`)."""
    low, high = binomial_interval(k, n)
    return f"{100 * k / n:.0f}% [{100 * float(low):.0f}, {100 * float(high):.0f}]"


def pct(values: list[float], q: float) -> str:
    return "-" if not values else f"{np.percentile(values, q):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30, help="test images attacked per attack")
    parser.add_argument("--budget", type=int, default=1000, help="queries per image (the attacks' default)")
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--pipeline", default="none", help="a shipped pipeline of data/defenses")
    parser.add_argument("--attacks", default="square,rays")
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--neighbours", type=int, default=4)
    parser.add_argument("--min-queries", type=int, default=25)
    parser.add_argument("--fpr", type=float, default=1e-3)
    parser.add_argument("--augmented", type=int, default=400, help="test images in the augmented stream")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    eps = float(Fraction(args.eps))
    rng = np.random.default_rng(args.seed)
    params = dict(window=args.window, neighbours=args.neighbours, min_queries=args.min_queries)

    train = read_table(ROOT / "data" / "fashion-mnist", split="train", attacks=["clean"], columns=[])
    test = read_table(ROOT / "data" / "fashion-mnist", split="test", attacks=["clean"], columns=[])
    start = time.perf_counter()
    watch = CampaignWatch.calibrate(train.logits, fpr=args.fpr, seed=args.seed, **params)
    print(f"calibrated on {len(train.logits)} train clean rows in {time.perf_counter() - start:.1f} s: "
          f"threshold {watch.threshold:.3f} at fpr {args.fpr:g} (median benign k-NN distance "
          f"{watch.calibration['median_distance']:.2f}); window {args.window}, k {args.neighbours}, "
          f"min_queries {args.min_queries}")

    model = load_model(ROOT / "data" / "fashion-mnist-cnn").eval()
    recorder = Recorder(model).eval()
    meta = read_table(ROOT / "data" / "fashion-mnist", split="test", attacks=["clean"], columns=[]).metadata
    recipe = NoiseRecipe(tuple((q["kind"], q["scale"]) for q in meta["noise"]["recipe"]))
    mirror = load_pipeline_mirror(load_pipelines(ROOT / "data" / "defenses" / "defenses.json")[args.pipeline])
    images = load_dataset("fashion-mnist", "test")
    order = rng.permutation(len(images.labels))
    with torch.no_grad():
        head = order[:4 * args.samples]
        right = head[model(images.load(head)).argmax(1).numpy() == images.labels[head]]
    chosen = right[:args.samples]

    rows = []
    print(f"\npipeline {args.pipeline}, eps {args.eps}, budget {args.budget}, {len(chosen)} correctly classified "
          f"test images per attack, one at a time")
    for name in args.attacks.split(","):
        attack = make_attack(name, recorder, defense=mirror, noise=recipe, eps=eps, queries=args.budget,
                             batch_size=1)
        alarm_at, success_at, caught, alarmed, queries = [], [], 0, 0, 0
        start = time.perf_counter()
        for i, index in enumerate(chosen):
            x = images.load(np.array([index]))
            y = torch.as_tensor(images.labels[[index]])
            recorder.take()
            attack.perturb(x, y, torch.Generator().manual_seed(args.seed + i))
            used = int(attack.take_queries()[0])  # the query of the attack's success within eps, -1: none
            stream = recorder.take()
            queries += len(stream)
            alarm = first(watch.observe(f"{name}-{i}", stream, now=0.0))
            success = used if used > 0 else None
            if alarm is not None:
                alarmed += 1
                alarm_at.append(alarm)
            if success is not None:
                success_at.append(success)
                caught += alarm is not None and alarm <= success
        rows.append((name, len(chosen), queries, success_at, alarm_at, caught, alarmed, time.perf_counter() - start))

    print(f"\n{'attack stream':14} {'streams':>7} {'queries':>8} {'succeeded':>9} {'success q':>10} "
          f"{'alarmed':>7} {'alarm q med':>11} {'p90':>5} {'caught before success [95% CI]':>30} {'attack s':>8}")
    for name, n, queries, success_at, alarm_at, caught, alarmed, seconds in rows:
        share = f"{caught}/{len(success_at)}" + (f" ({interval(caught, len(success_at))})" if success_at else "")
        print(f"{name:14} {n:7} {queries:8} {len(success_at):9} {pct(success_at, 50):>10} {alarmed:7} "
              f"{pct(alarm_at, 50):>11} {pct(alarm_at, 90):>5} {share:>30} {seconds:8.0f}")

    # benign streams: one client each, fed one row per request at one query a second
    clean = test.logits
    pred = clean.argmax(1)
    with torch.no_grad():
        picked = rng.permutation(len(images.labels))[:args.augmented]
        augmented = model(augment(images.load(picked), rng, 5)).numpy()
    benign = {"test, random order": clean[rng.permutation(len(clean))],
              "test, one class a burst": np.concatenate([clean[rng.permutation(np.flatnonzero(pred == c))]
                                                         for c in np.unique(pred)]),
              f"augmented x5 ({args.augmented} images)": augmented}
    print(f"\n{'benign stream':30} {'queries':>8} {'alarmed rows':>12} {'per 10k':>8} {'alarm onsets':>12} "
          f"{'near rows':>9}")
    total = alarmed_total = 0
    for name, stream in benign.items():
        before = watch.metrics()
        alarms = watch.observe(f"benign {name}", stream, now=0.0)
        summary = watch.status(f"benign {name}")["clients"][0]
        onsets = watch.metrics()["alarms_total"] - before["alarms_total"]
        total, alarmed_total = total + len(stream), alarmed_total + int(alarms.sum())
        print(f"{name:30} {len(stream):8} {int(alarms.sum()):12} {1e4 * alarms.mean():8.1f} {onsets:12} "
              f"{summary['near_total']:9}")
    high = 1e4 * float(binomial_interval(alarmed_total, total)[1])
    print(f"{'all benign':30} {total:8} {alarmed_total:12} {1e4 * alarmed_total / total:8.1f}  (95% CI upper "
          f"bound {high:.1f} per 10k)")

    print(f"\n{'observe cost':30} {'window':>7} {'rows/request':>12} {'us/row':>8}")
    for window in (100, 1000):
        for per_request in (1, 64):
            w = CampaignWatch(watch.threshold, window=window, neighbours=args.neighbours,
                              min_queries=min(args.min_queries, window))
            w.observe("c", clean[:window], now=0.0)  # a full window
            stream = clean[rng.permutation(len(clean))]
            requests = [stream[i:i + per_request] for i in range(0, min(len(stream), 200 * per_request),
                                                                 per_request)]
            start = time.perf_counter()
            for i, r in enumerate(requests):
                w.observe("c", r, now=float(i))
            seconds = time.perf_counter() - start
            print(f"{'one client, full window':30} {window:7} {per_request:12} "
                  f"{1e6 * seconds / sum(len(r) for r in requests):8.1f}")


if __name__ == "__main__":
    main()
