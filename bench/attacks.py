"""Throughput of our attacks against ART's on the same model and images, plus a plain-torch PGD loop.

    python bench/attacks.py [--dataset digits|fashion-mnist] [--n 512] [--batch-size 256] [--model PATH]
    python bench/attacks.py --device cuda --arch resnet50 [--image-size 224] [--precisions fp32,bf16]

The second form times every attack at each precision (`Attack(precision=…)`) on a torchvision
architecture (random weights: no weights can be downloaded here) and random images, against the
model's own clean predictions, prints robust accuracy beside fp32's as the check that lower precision
did the same work, and extrapolates the seed paper's ImageNet export (1.28M training images x PGD plus
50k validation images x PGD, MIM, DeepFool, C&W) in GPU-hours. With `--model PATH --device cuda` the
first form runs on the GPU too (no ART there).

Trains a SmallCNN (or loads ``--model PATH`` when ``PATH.json`` exists; a model it trains is saved there;
``--train-n`` trains on a prefix, for Fashion-MNIST on a small machine), then attacks the first `n` test
images with each registered attack that imports and with the matching ART attack, in the same process,
and prints images per second. Timings are wall-clock after a warm-up; the best of `--repeats` runs
counts. Where ART would need far more than `--budget-s` (C&W, DeepFool), both sides attack the same
smaller prefix (column ``images``). Robust accuracy is printed beside the rates as a check that both
sides did the same work. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from producers.attacks import ATTACK_NAMES, make_attack  # noqa: E402
from producers.data.datasets import ImageSet, load_dataset  # noqa: E402
from producers.errors import ProducerError  # noqa: E402
from producers.models.classifiers import accuracy, load_model, save_model, small_cnn_for, train_classifier  # noqa: E402

EPOCHS = {"digits": 12, "fashion-mnist": 2}
# Our parameters per attack; the ART attack gets the same values under its own names (see `art_attack`).
# Every attack's eps is the one its defaults use: 16/255 for the L-inf family.
PARAMS: dict[str, dict] = {
    "fgsm": {"eps": 16 / 255},
    "bim": {"eps": 16 / 255, "alpha": 1.6 / 255, "steps": 10},
    "pgd": {"eps": 16 / 255, "alpha": 2 / 255, "steps": 10, "random_start": True},
    "mim": {"eps": 16 / 255, "alpha": 1.6 / 255, "steps": 10, "decay": 1.0},
    "deepfool": {"max_iter": 100, "overshoot": 0.02, "candidates": 10},
    "cw": {"steps": 25, "lr": 0.1, "binary_search_steps": 4, "c_init": 10.0, "confidence": 0.0},
}


def art_attack(name: str, classifier, p: dict, batch_size: int):
    """The ART attack matching our `name` with parameters `p`."""
    from art.attacks import evasion

    common = {"batch_size": batch_size, "verbose": False}
    if name == "fgsm":
        return evasion.FastGradientMethod(classifier, norm=np.inf, eps=p["eps"], batch_size=batch_size)
    if name == "bim":
        return evasion.BasicIterativeMethod(classifier, eps=p["eps"], eps_step=p["alpha"], max_iter=p["steps"],
                                            **common)
    if name == "pgd":
        return evasion.ProjectedGradientDescent(classifier, norm=np.inf, eps=p["eps"], eps_step=p["alpha"],
                                                max_iter=p["steps"], num_random_init=int(p["random_start"]),
                                                **common)
    if name == "mim":
        return evasion.MomentumIterativeMethod(classifier, norm=np.inf, eps=p["eps"], eps_step=p["alpha"],
                                               max_iter=p["steps"], decay=p["decay"], **common)
    if name == "deepfool":
        return evasion.DeepFool(classifier, max_iter=p["max_iter"], epsilon=p["overshoot"],
                                nb_grads=p["candidates"], **common)
    if name == "cw":
        # Same budget, not the same algorithm: ART's C&W takes its steps with a line search started at
        # learning_rate (the seed paper's 0.01) where ours uses Adam at lr 0.1 (see producers/attacks/cw.py),
        # and searches c by halving/doubling rather than bisection. Each side runs its own documented setting.
        return evasion.CarliniL2Method(classifier, confidence=p["confidence"], learning_rate=0.01,
                                       binary_search_steps=p["binary_search_steps"], max_iter=p["steps"],
                                       initial_const=p["c_init"], **common)
    raise KeyError(name)


def plain_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
              batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The textbook L-inf PGD loop, batched, as a floor for what our PGD should cost."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        adv = (xb + torch.empty_like(xb).uniform_(-eps, eps, generator=generator)).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), yb), adv)
            adv = adv.detach() + alpha * grad.sign()
            adv = torch.min(torch.max(adv, xb - eps), xb + eps).clamp(0, 1)
        out.append(adv)
    return torch.cat(out)


def best_rate(run: Callable[[], torch.Tensor], n: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Images per second of `run` (best of `repeats`) and its last output."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return n / best, out


def get_model(args, train_set) -> nn.Module:
    if args.model and Path(args.model).with_suffix(".json").exists():
        print(f"loading {args.model}")
        return load_model(args.model)
    epochs = args.epochs or EPOCHS.get(args.dataset, 2)
    if args.train_n and args.train_n < len(train_set):
        idx = np.arange(args.train_n)
        train_set = ImageSet.in_memory(train_set.name, "train", train_set.load(idx), train_set.labels[idx],
                                       train_set.class_names)
    print(f"training SmallCNN on {args.dataset} ({len(train_set)} images, {epochs} epochs)")
    torch.manual_seed(0)
    model = train_classifier(small_cnn_for(train_set), train_set, epochs=epochs, seed=0, progress=False)
    if args.model:
        save_model(model, args.model, overwrite=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", help="digits (built in) or fashion-mnist")
    parser.add_argument("--root", default=None, help="data folder, for datasets that need files")
    parser.add_argument("--n", type=int, default=512, help="test images attacked (at most the split size)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per attack; the best counts")
    parser.add_argument("--budget-s", type=float, default=30.0,
                        help="rough seconds for ART's timed runs of one attack; slow ones get fewer images")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: 12 digits, 2 others)")
    parser.add_argument("--train-n", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs available)")
    parser.add_argument("--model", default=None, help="load PATH.pt/.json if present, else train and save there")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--arch", default=None,
                        help="zoo mode: a torchvision architecture (e.g. resnet50) or a saved model's path stem")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--precisions", default="fp32,bf16", help="zoo mode: precisions to time")
    parser.add_argument("--attacks", default=None, help="comma-separated subset of the attacks")
    args = parser.parse_args()
    if args.arch:
        zoo_main(args)
        return

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    try:
        train_set, test_set = load_dataset(args.dataset, "train", root=args.root), \
            load_dataset(args.dataset, "test", root=args.root)
    except ProducerError as exc:
        sys.exit(f"Error: {exc}")
    model = get_model(args, train_set).eval().to(args.device)
    n = min(args.n, len(test_set))
    x = test_set.load(np.arange(n))
    y = torch.as_tensor(test_set.labels[:n])
    print(f"torch {torch.__version__}, {threads} threads; {args.dataset}: {n} test images "
          f"{tuple(x.shape[1:])}, batch {args.batch_size}, clean accuracy {accuracy(model, test_set):.3f}")

    x, y = x.to(args.device), y.to(args.device)
    try:
        if args.device != "cpu":
            raise ImportError("ART comparisons run on the CPU only")
        from art.estimators.classification import PyTorchClassifier

        classifier = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                       nb_classes=test_set.num_classes, clip_values=(0.0, 1.0))
    except ImportError:
        classifier = None
        print("note: ART is not installed; only our attacks are timed")

    def robust(adv: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(adv.to(args.device)).argmax(1) == labels.to(args.device)).float().mean())

    rows = []
    for name in (args.attacks.split(",") if args.attacks else ATTACK_NAMES):
        params = PARAMS.get(name, {})
        try:
            attack = make_attack(name, model, batch_size=args.batch_size, device=args.device, **params)
        except (ImportError, AttributeError) as exc:
            print(f"note: skipping {name}: {exc}")
            continue
        theirs = None if classifier is None else art_attack(name, classifier, params, args.batch_size)
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        m = n
        attack(x[:8], y[:8])  # warm-up
        if theirs is not None:
            theirs.generate(x[:2].numpy(), y=y[:2].numpy())  # warm-up
            art_estimate, _ = best_rate(lambda: theirs.generate(x[:8].numpy(), y=y[:8].numpy()), 8, 1)
            # ART's slow attacks (C&W, DeepFool) would take minutes on all n: both sides get fewer images.
            m = int(min(n, max(8, args.budget_s / args.repeats * art_estimate)))
        xm, ym = x[:m], y[:m]
        ours_rate, ours_adv = best_rate(lambda: attack(xm, ym, generator=generator(args.device)), m, args.repeats)
        art_rate = art_acc = float("nan")
        if theirs is not None:
            x_np, y_np = xm.numpy(), ym.numpy()
            art_rate, art_adv = best_rate(lambda: torch.from_numpy(theirs.generate(x_np, y=y_np)), m, args.repeats)
            art_acc = robust(art_adv, ym)
        rows.append((name, m, ours_rate, art_rate, robust(ours_adv, ym), art_acc))

    print(f"\n{'attack':<10}{'images':>7}{'ours img/s':>12}{'ART img/s':>12}{'ours/ART':>10}"
          f"{'robust acc ours / ART':>24}")
    for name, m, ours_rate, art_rate, ours_acc, art_acc in rows:
        print(f"{name:<10}{m:>7}{ours_rate:>12.0f}{art_rate:>12.1f}{ours_rate / art_rate:>10.2f}"
              f"{ours_acc:>15.3f} / {art_acc:.3f}")

    if any(row[0] == "pgd" for row in rows):
        p = PARAMS["pgd"]
        pgd = make_attack("pgd", model, batch_size=args.batch_size, device=args.device, **p)
        runs = {
            "ours": lambda: pgd(x, y, generator=generator(args.device)),
            "plain": lambda: plain_pgd(model, x, y, eps=p["eps"], alpha=p["alpha"], steps=p["steps"],
                                       batch_size=args.batch_size, generator=generator(args.device)),
        }
        # Interleaved, best of several: a load spike from other processes then hits both sides alike.
        rates = {key: 0.0 for key in runs}
        for _ in range(args.repeats + 2):
            for key, run in runs.items():
                rates[key] = max(rates[key], best_rate(run, n, 1)[0])
        print(f"\nPGD vs a plain torch loop ({n} images): ours {rates['ours']:.0f} img/s, "
              f"plain {rates['plain']:.0f} img/s, ratio {rates['ours'] / rates['plain']:.2f} (target >= 1.0)")


def generator(device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def synchronized(run: Callable[[], torch.Tensor], device: str) -> Callable[[], torch.Tensor]:
    """`run`, waiting for the GPU's queued work before the clock stops."""
    def wrapped() -> torch.Tensor:
        out = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out
    return wrapped


# The seed paper's ImageNet export (seed 000): PGD on the training split, four attacks on validation.
IMAGENET_EXPORT = {"pgd": 1_281_167 + 50_000, "mim": 50_000, "deepfool": 50_000, "cw": 50_000}


def zoo_main(args) -> None:
    """Every attack x precision on a random-weight zoo model and random images (see the module docstring)."""
    from producers.models.classifiers import resolve_model

    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: we time, we do not classify
        model = resolve_model(args.arch, num_classes=args.classes, device=args.device)
    config = model.config
    shape = (config["in_channels"], *config["image_size"]) if "image_size" in config else \
        (3, args.image_size, args.image_size)
    x = torch.rand(args.n, *shape, device=args.device)
    with torch.no_grad():
        y = torch.cat([model(x[i:i + args.batch_size]).argmax(1) for i in range(0, args.n, args.batch_size)])
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    weights = "random weights" if config.get("arch") != "small-cnn" else "trained"
    print(f"torch {torch.__version__} on {name}: {args.arch} ({weights}) at {tuple(shape)}, {args.n} random images, "
          f"batch {args.batch_size}; labels = the model's clean predictions")
    precisions = args.precisions.split(",")
    attacks = args.attacks.split(",") if args.attacks else list(IMAGENET_EXPORT)
    rates: dict[tuple[str, str], float] = {}
    print(f"\n{'attack':<10}" + "".join(f"{p + ' img/s':>14}{p + ' robust':>12}" for p in precisions))
    for attack_name in attacks:
        cells = []
        for precision in precisions:
            try:
                attack = make_attack(attack_name, model, batch_size=args.batch_size, device=args.device,
                                     precision=precision, **PARAMS[attack_name])
            except ValueError:  # an attack that runs in fp32 only (DeepFool): its fp32 rate counts
                rates[attack_name, precision] = rates.get((attack_name, "fp32"), float("nan"))
                cells.append(f"{'fp32 only':>14}{'':>12}")
                continue
            attack(x[:args.batch_size], y[:args.batch_size], generator=generator(args.device))  # warm-up
            rate, adv = best_rate(synchronized(lambda: attack(x, y, generator=generator(args.device)), args.device),
                                  args.n, args.repeats)
            with torch.no_grad():
                acc = float(torch.cat([model(adv[i:i + args.batch_size].to(args.device)).argmax(1)
                                       for i in range(0, args.n, args.batch_size)]).eq(y).float().mean())
            rates[attack_name, precision] = rate
            cells.append(f"{rate:>14.1f}{acc:>12.3f}")
        print(f"{attack_name:<10}" + "".join(cells), flush=True)
    for precision in precisions:
        if all((a, precision) in rates for a in IMAGENET_EXPORT):
            hours = sum(n / rates[a, precision] for a, n in IMAGENET_EXPORT.items()) / 3600
            print(f"seed paper's ImageNet export at {precision}: {hours:.2f} GPU-hours by extrapolation "
                  "(target <= 1)")


if __name__ == "__main__":
    main()
