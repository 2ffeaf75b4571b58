"""The SVM corrector's two methods: exact one-vs-one SVC against the Nyström least-squares SVM.

    python bench/svm.py [--data DIR] [--classes 1000] [--train-rows 20000,200000] [--test-rows 10000]
                        [--repeats 3] [--sklearn-svc]

1. C=10, the embedded table: both methods trained on the FGSM train rows (as `logitguard train-svm`),
   fit time, prediction rows/s and corrected accuracy on the test rows of clean, FGSM, PGD, BIM, MIM, DeepFool and C&W,
   beside the model's own argmax; which method `auto` picks; how often the two methods agree.
2. C=`--classes`, a synthetic table (below): for each training size and C in (1, 0.1), fit time,
   prediction rows/s and accuracy on FGSM and clean test rows beside the model's argmax. The exact
   method is refused at this size (its coefficient matrix); `--sklearn-svc` also times scikit-learn's
   own `SVC` on the first training size (minutes at 1000 classes).

The synthetic table: inputs in 256 dimensions drawn around one Gaussian mean per class (means
N(0, 0.5²), spread 1.75 per dimension), a linear "model" whose weights are the class means plus
N(0, 0.2²) and whose biases are -½‖w‖² (clean accuracy about 80% at 1000 classes), and FGSM on its
cross-entropy with the exact input gradient Wᵀ(softmax − onehot), L∞ ε = 0.2 (inputs are unbounded,
no clipping): the logits of x + ε sign(∇) are the attacked rows (about 15% accuracy).

Wall-clock after a warm-up; the best of `--repeats` runs counts for prediction. Figures only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import best_time  # noqa: E402

from logitguard import LogitguardError, read_table  # noqa: E402
from logitguard.defenses.svm import SVMCorrector  # noqa: E402

ATTACKS = ["clean", "fgsm", "pgd", "bim", "mim", "deepfool", "cw"]


def synthetic(classes: int, rows: int, *, dim: int = 256, eps: float = 0.2, spread: float = 1.75,
              seed: int = 0, chunk: int = 20_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clean logits, FGSM logits (both float32, rows × classes) and labels of the synthetic table above.
    The model (means, weights) depends only on `classes` and `dim`; the rows on `rows` and `seed` too."""
    model = np.random.default_rng([classes, dim])
    means = model.normal(size=(classes, dim)) * 0.5
    weights = means + model.normal(size=(classes, dim)) * 0.2
    bias = -0.5 * (weights * weights).sum(axis=1)
    rng = np.random.default_rng([seed, classes, dim, rows])
    labels = rng.integers(0, classes, rows)
    clean, attacked = np.empty((rows, classes), np.float32), np.empty((rows, classes), np.float32)
    for start in range(0, rows, chunk):
        y = labels[start:start + chunk]
        x = means[y] + rng.normal(size=(len(y), dim)) * spread
        z = x @ weights.T + bias
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(y)), y] -= 1.0  # d CE / d z
        clean[start:start + chunk] = z
        attacked[start:start + chunk] = (x + eps * np.sign(p @ weights)) @ weights.T + bias
    return clean, attacked, labels


def accuracy(pred: np.ndarray, labels: np.ndarray) -> str:
    return f"{100 * (pred == labels).mean():5.1f}"


def embedded(data: str, repeats: int) -> None:
    table = read_table(data, columns=[])
    test = {a: table.select(split="test", attacks=a) for a in ATTACKS if a in table.attacks}
    print(f"1. C={table.num_classes}, {data}: trained on {len(table.select(split='train', attacks='fgsm'))} FGSM "
          f"train rows; accuracy (%) on test rows")
    rows = np.concatenate([r.logits for r in test.values()])
    print(f"  {'':22s} {'fit s':>6s} {'rows/s':>8s} " + " ".join(f"{a:>8s}" for a in test))
    print(f"  {'model argmax':22s} {'':6s} {'':8s} " + " ".join(f"{accuracy(r.logits.argmax(1), r.labels):>8s}"
                                                       for r in test.values()))
    fitted, train = {}, table.select(split="train")
    for method in ("auto", "exact", "nystroem"):
        start = time.perf_counter()
        svm = SVMCorrector(method=method).fit_table(train, "fgsm")
        seconds = time.perf_counter() - start
        fitted[method] = svm
        speed = len(rows) / best_time(lambda: svm.predict(rows), repeats)
        name = f"{method} ({svm.method_})" if method == "auto" else method
        print(f"  {name:22s} {seconds:6.2f} {speed:8.0f} " + " ".join(f"{accuracy(svm.predict(r.logits), r.labels):>8s}"
                                                          for r in test.values()))
    agree = " ".join(f"{100 * (fitted['exact'].predict(r.logits) == fitted['nystroem'].predict(r.logits)).mean():8.1f}"
                     for r in test.values())
    print(f"  {'exact = nystroem (%)':22s} {'':6s} {'':8s} {agree}")


def scaled(classes: int, train_rows: list[int], test_rows: int, repeats: int, sklearn_svc: bool) -> None:
    start = time.perf_counter()
    _, attacked, labels = synthetic(classes, max(train_rows))
    clean_test, attacked_test, test_labels = synthetic(classes, test_rows, seed=1)
    print(f"\n2. C={classes}, synthetic (see the module; made in {time.perf_counter() - start:.0f} s): accuracy (%) "
          f"on {test_rows} test rows")
    print(f"  model argmax: clean {accuracy(clean_test.argmax(1), test_labels)}, "
          f"FGSM {accuracy(attacked_test.argmax(1), test_labels)}")
    rows = min(train_rows)
    try:
        start = time.perf_counter()
        exact = SVMCorrector(method="exact").fit(attacked[:rows], labels[:rows])
        print(f"  exact, {rows} train rows: fit {time.perf_counter() - start:.1f} s, FGSM "
              f"{accuracy(exact.predict(attacked_test), test_labels)}")
    except LogitguardError as exc:
        print(f"  exact, {rows} train rows: refused: {exc}")
    print(f"  {'nystroem, 1000 landmarks':28s} {'fit s':>6s} {'predict rows/s':>15s} {'FGSM':>6s} {'clean':>6s}")
    for rows in train_rows:
        for c in (1.0, 0.1):
            svm = SVMCorrector(method="nystroem", C=c, max_rows=rows)
            start = time.perf_counter()
            svm.fit(attacked[:rows], labels[:rows])
            seconds = time.perf_counter() - start
            speed = test_rows / best_time(lambda: svm.predict(attacked_test), repeats)
            print(f"  {f'{rows} train rows, C={c:g}':28s} {seconds:6.1f} {speed:15.0f} "
                  f"{accuracy(svm.predict(attacked_test), test_labels):>6s} "
                  f"{accuracy(svm.predict(clean_test), test_labels):>6s}")
    if sklearn_svc:
        from sklearn.svm import SVC

        rows = min(train_rows)
        x = (attacked[:rows] - attacked[:rows].mean(0)) / attacked[:rows].std(0)
        start = time.perf_counter()
        svc = SVC(gamma="scale").fit(x, labels[:rows])
        seconds = time.perf_counter() - start
        probe = (attacked_test[:200] - attacked[:rows].mean(0)) / attacked[:rows].std(0)
        start = time.perf_counter()
        svc.predict(probe)
        speed = len(probe) / (time.perf_counter() - start)
        print(f"  scikit-learn SVC (one-vs-one), {rows} rows: fit {seconds:.0f} s, predict {speed:.0f} rows/s "
              f"(on 200 rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"))
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train-rows", default="20000,200000", help="Comma-separated training sizes.")
    parser.add_argument("--test-rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sklearn-svc", action="store_true", help="Also time scikit-learn's SVC at C=--classes.")
    args = parser.parse_args()
    embedded(args.data, args.repeats)
    scaled(args.classes, [int(r) for r in args.train_rows.split(",")], args.test_rows, args.repeats, args.sklearn_svc)


if __name__ == "__main__":
    main()
