"""Throughput of the logit corrector: inference beside raw torch matmul, training, and reduced precision.

    python bench/corrector.py [--classes 1000] [--hidden 10000] [--batch 4096] [--repeats 5] [--data DIR]
    python bench/corrector.py --device cuda --batch 1000000 --inference-only

1. Inference rows/s at C x D with batch `--batch` on synthetic logits, through `LogitCorrector.correct`
   (NumPy in, NumPy out), beside the GFLOP/s of the same two matrix products done by bare `torch.mm`
   in the same run. The ratio says how much of the machine's matmul speed the corrector keeps
   (target >= 0.9 on a CPU). With ``--device cuda`` the bare products run on tensors already on the GPU
   while the corrector goes NumPy → GPU → NumPy, transfers included (target >= 0.7).
2. Training rows/s (Algorithm 1 mini-batches, dropout, Adam) at the same C x D and the default batch 256.
3. Reduced precision: bf16 weights and int8 dynamic quantisation (torch.ao), each timed at C x D and
   checked on the embedded data (a corrector trained on PGD, accuracy change on the test split).

Wall-clock after a warm-up; the best of `--repeats` runs counts. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import best_time, untrained_corrector  # noqa: E402

from logitguard import pair, read_table  # noqa: E402
from logitguard.defenses.corrector import LogitCorrector  # noqa: E402


def reduced(corrector: LogitCorrector, kind: str) -> LogitCorrector:
    """A copy of `corrector` whose network runs in bf16 or int8 (dynamic quantisation)."""
    copy = untrained_corrector(corrector.n_classes_, corrector.hidden)
    copy.model_.load_state_dict(corrector.model_.state_dict())
    if kind == "bf16":
        net = copy.model_.to(torch.bfloat16)
        copy.model_ = torch.nn.Sequential(_Cast(torch.bfloat16), net)
    else:
        copy.model_ = torch.ao.quantization.quantize_dynamic(copy.model_, {torch.nn.Linear}, dtype=torch.qint8)
    return copy


class _Cast(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"))
    parser.add_argument("--epochs", type=int, default=50, help="Epochs of the PGD corrector for the precision check.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inference-only", action="store_true", help="Only part 1.")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization's notices
    warnings.filterwarnings("ignore", message=".*quantize.*")
    torch.manual_seed(0)
    c, d, b = args.classes, args.hidden, args.batch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; C={c}, D={d}, batch={b}")

    # 1. Inference beside bare matmul.
    x = np.random.default_rng(0).normal(size=(b, c)).astype(np.float32)
    corrector = untrained_corrector(c, d)
    corrector.device, corrector.model_ = args.device, corrector.model_.to(args.device)
    w1, w2 = torch.randn(c, d, device=args.device), torch.randn(d, c, device=args.device)
    xt = torch.from_numpy(x).to(args.device)
    flops = 2.0 * b * c * d * 2  # two products, multiply + add
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    chunk = min(b, 65536)  # the bare products in chunks too: a (b, D) intermediate would not fit

    def bare() -> None:
        for i in range(0, b, chunk):
            torch.mm(torch.mm(xt[i:i + chunk], w1), w2)
        sync()

    t_mm = best_time(bare, args.repeats)
    t_inf = best_time(lambda: corrector.correct(x), args.repeats)
    print(f"\ninference on {args.device}")
    print(f"  torch.mm pair       {flops / t_mm / 1e9:8.1f} GFLOP/s   ({b / t_mm:9.0f} rows/s)")
    print(f"  LogitCorrector      {flops / t_inf / 1e9:8.1f} GFLOP/s   ({b / t_inf:9.0f} rows/s)")
    print(f"  ratio corrector/mm  {t_mm / t_inf:8.2f}   (target >= {0.7 if args.device.startswith('cuda') else 0.9})")
    if args.inference_only:
        return

    # 2. Training throughput: one epoch over 4 * batch synthetic pairs.
    n = 4 * b
    clean = np.random.default_rng(1).normal(size=(n, c)).astype(np.float32)
    attacked = clean + np.random.default_rng(2).normal(size=(n, c)).astype(np.float32)
    labels = np.random.default_rng(3).integers(0, c, n)
    trainer = LogitCorrector(hidden=d, epochs=1, progress=False)
    t_train = best_time(lambda: trainer.fit(clean, attacked, labels), max(1, args.repeats // 2))
    print(f"\ntraining (batch {trainer.batch_size}, dropout, Adam)\n  {n / t_train:9.0f} rows/s")

    # 3. Reduced precision: speed at C x D, accuracy on the embedded data.
    print("\nreduced precision")
    speed = {"fp32": t_inf}
    for kind in ("bf16", "int8"):
        fast = reduced(corrector, kind)  # converted once, outside the timing
        speed[kind] = best_time(lambda: fast.correct(x), args.repeats)
    table = read_table(args.data, columns=[])
    pgd = LogitCorrector(epochs=args.epochs, progress=False).fit_table(table.select(split="train"), "pgd")
    test = table.select(split="test")
    rows = {name: pair(test, "pgd")[i] for i, name in enumerate(("clean", "pgd"))}
    for kind in ("fp32", "bf16", "int8"):
        model = pgd if kind == "fp32" else reduced(pgd, kind)
        accs = {name: model.score(r.logits, r.labels) for name, r in rows.items()}
        base = {name: pgd.score(r.logits, r.labels) for name, r in rows.items()}
        change = max(abs(accs[k] - base[k]) for k in accs) * 100
        print(f"  {kind:5s} {speed['fp32'] / speed[kind]:5.2f}x fp32 speed at C={c}; on {args.data}: "
              f"clean {100 * accs['clean']:.1f}%, pgd {100 * accs['pgd']:.1f}% (max change {change:.2f} pp)")


if __name__ == "__main__":
    main()
