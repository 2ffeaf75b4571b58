"""Throughput of the vectorised odds test beside a straightforward per-sample loop, in the same run.

    python bench/odds.py [--rows 2000] [--loop-rows 200] [--queries 8] [--classes 10,1000]

Synthetic logits and noise queries (Gaussian) with C classes and K queries. For each C: fit (per-class
statistics on clean rows, plus threshold calibration for `OddsTest`) and score (z-scores, max over
classes), as rows per second, for `OddsTest` and for the straightforward loop over samples (NumPy on
one row's K x C block at a time), timed on `--loop-rows` rows. The last column is the largest relative
difference between the two scores. Target: vectorised ≥ 50× the loop. Figures only: nothing is asserted.

    python bench/odds.py --variants [--table data/fashion-mnist] [--fit-attack pgd]

Fidelity to Roth et al.'s reference code instead: every aggregation x thresholds x correction variant is
fitted on the train split (clean rows; the correction classifiers also on `--fit-attack`) and evaluated on
the test split: AUROC and TPR at 5% FPR against each standard attack's successful rows, and the share of
flagged, successfully attacked `--fit-attack` rows whose true label the correction rule recovers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from logitguard import LogitTable, read_table  # noqa: E402
from logitguard.defenses.detectors import OddsTest  # noqa: E402
from logitguard.evaluation.evaluate import detection_table  # noqa: E402
from logitguard.tables import pair  # noqa: E402

ATTACKS = ("pgd", "bim", "mim", "fgsm", "deepfool", "cw")
AGGREGATIONS = ("query", "per-kind", "mean")
CORRECTIONS = ("argmax", "logistic", "reference")


def synthetic(rows: int, classes: int, queries: int, seed: int) -> LogitTable:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    logits = rng.normal(size=(rows, classes)).astype(np.float32)
    logits[np.arange(rows), labels] += 4.0
    noisy = logits[:, None, :] + rng.normal(scale=0.3, size=(rows, queries, classes)).astype(np.float32)
    return LogitTable.from_arrays(logits=logits, noisy_logits=noisy, label=labels, sample_id=np.arange(rows),
                                  split="train", attack="clean")


def loop_fit(table: LogitTable) -> tuple[np.ndarray, np.ndarray]:
    """Per-(y, k, z) mean and std, accumulated sample by sample (NumPy over one row's K x C block)."""
    c, k = table.num_classes, table.noisy_logits.shape[1]
    total, square, count = np.zeros((c, k, c)), np.zeros((c, k, c)), np.zeros(c)
    for logits, noisy in zip(table.logits.astype(np.float64), table.noisy_logits.astype(np.float64)):
        y = logits.argmax()
        g = (noisy - noisy[:, y:y + 1]) - (logits - logits[y])
        total[y] += g
        square[y] += g * g
        count[y] += 1
    mean = total / np.maximum(count, 1)[:, None, None]
    std = np.sqrt(np.maximum(square / np.maximum(count, 1)[:, None, None] - mean**2, 0.0))
    return mean, np.maximum(std, 1e-6)


def loop_score(table: LogitTable, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The score, sample by sample."""
    scores = np.empty(len(table))
    for n, (logits, noisy) in enumerate(zip(table.logits.astype(np.float64), table.noisy_logits.astype(np.float64))):
        y = logits.argmax()
        g = (noisy - noisy[:, y:y + 1]) - (logits - logits[y])
        z = ((g - mean[y]) / std[y]).mean(axis=0)
        z[y] = -np.inf
        scores[n] = z.max()
    return scores


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def corrected_share(odds: OddsTest, test: LogitTable, attack: str) -> tuple[float, int]:
    """Share of the flagged, successfully attacked rows of `attack` that `odds.correct` labels right, and their count."""
    clean, rows = pair(test, attack)
    hit = rows.take((clean.logits.argmax(1) == clean.labels) & (rows.logits.argmax(1) != rows.labels))
    flagged = hit.take(odds.flag_table(hit))
    if not len(flagged):
        return float("nan"), 0
    return float((odds.correct_table(flagged) == flagged.labels).mean()), len(flagged)


def variants(path: str, fit_attack: str) -> None:
    """Detection and correction figures of every odds-test variant (see the module docstring)."""
    table = read_table(path)
    train, test = table.select(split="train"), table.select(split="test")
    attacks = [a for a in ATTACKS if a in test.attacks]
    test = test.select(attacks=["clean", *attacks])
    print(f"{path}: fit on train (clean + {fit_attack} for the classifiers), evaluated on test")
    print(f"{'aggregation':>11} {'thresholds':>10} " + " ".join(f"{a + ' AUC/TPR5':>15}" for a in attacks))
    for aggregation in AGGREGATIONS:
        for thresholds in ("global", "pair"):
            odds = OddsTest(aggregation=aggregation, thresholds=thresholds).fit_table(train, attacks=[])
            frame = detection_table(test, {"odds": odds}, attacks=attacks).set_index("attack")
            cells = [f"{frame.loc[a, 'auroc']:.3f}/{frame.loc[a, 'tpr_at_5']:.3f}" for a in attacks]
            print(f"{aggregation:>11} {thresholds:>10} " + " ".join(f"{c:>15}" for c in cells))
    print(f"corrected share of flagged successful {fit_attack} rows (thresholds='global'):")
    print(f"{'aggregation':>11} " + " ".join(f"{c:>10}" for c in CORRECTIONS) + "  flagged")
    for aggregation in AGGREGATIONS:
        shares = []
        for correction in CORRECTIONS:
            odds = OddsTest(aggregation=aggregation, correction=correction).fit_table(
                train, attacks=[] if correction == "argmax" else [fit_attack])
            shares.append(corrected_share(odds, test, fit_attack))
        print(f"{aggregation:>11} " + " ".join(f"{share:10.3f}" for share, _ in shares) + f"  {shares[0][1]:7d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", action="store_true", help="Compare the odds-test variants on a table.")
    parser.add_argument("--table", default=str(Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"))
    parser.add_argument("--fit-attack", default="pgd", help="Attack the correction classifiers learn from.")
    parser.add_argument("--rows", type=int, default=20000, help="Rows for the vectorised odds test.")
    parser.add_argument("--loop-rows", type=int, default=200, help="Rows for the per-sample loop.")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--classes", default="10,1000")
    args = parser.parse_args()
    if args.variants:
        variants(args.table, args.fit_attack)
        return
    print(f"K={args.queries}; vectorised on {args.rows} rows, loop on {args.loop_rows} rows; rows/s")
    print(f"{'C':>5} {'fit vec':>10} {'fit loop':>10} {'ratio':>7} {'score vec':>10} {'score loop':>10} {'ratio':>7}"
          f"  rel. diff")
    for classes in (int(c) for c in args.classes.split(",")):
        rows = args.rows if classes <= 100 else max(args.rows // 10, 2 * classes)
        table = synthetic(rows, classes, args.queries, seed=0)
        small = table.take(np.arange(args.loop_rows))
        odds = OddsTest(min_rows=1)
        _, t_fit = timed(lambda: odds.fit_table(table))
        _, t_score = timed(lambda: odds.score_table(table))
        (mean, std), t_loop_fit = timed(lambda: loop_fit(small))
        loop_scores, t_loop_score = timed(lambda: loop_score(small, mean, std))
        check = OddsTest(min_rows=1).fit_table(small)
        diff = float((np.abs(check.score_table(small) - loop_scores) / np.maximum(np.abs(loop_scores), 1.0)).max())
        fit_vec, fit_loop = rows / t_fit, args.loop_rows / t_loop_fit
        score_vec, score_loop = rows / t_score, args.loop_rows / t_loop_score
        print(f"{classes:5d} {fit_vec:10.0f} {fit_loop:10.1f} {fit_vec / fit_loop:6.0f}x {score_vec:10.0f} "
              f"{score_loop:10.1f} {score_vec / score_loop:6.0f}x  {diff:.1e}")


if __name__ == "__main__":
    main()
