"""The odds test (Roth et al. 2019, "The odds are odd"; seed 003 §9.3), from logits alone.

For a row with predicted class y and every other class z, the pairwise log-odds is
f_z − f_y. Adding noise to an adversarial input tends to move it back towards its true class, so the
log-odds of that class rises more than it does for clean inputs. With noise queries x + η_k:

    g_k[y, z] = (f_z − f_y)(x + η_k) − (f_z − f_y)(x)            shape (N, K, C) per row batch

``aggregation`` says how the K queries are z-scored against clean training rows predicted as y, per
(y, group, z), before the group z-scores are averaged into one (N, C) feature whose maximum over z ≠ y is
the score:

- ``"query"`` (default): every query is its own group.
- ``"per-kind"``: Roth et al.'s code. The draws of one noise kind (one recipe item, e.g. ``gaussian:0.05``,
  from the table's ``noise`` metadata or ``noise_kinds=``) are averaged, each kind's average is z-scored,
  and the kinds are averaged.
- ``"mean"``: the K-average is z-scored once.

On the embedded data (`python bench/odds.py --variants`), PGD AUROC was 0.941 (query), 0.939 (per-kind)
and 0.918 (mean).

``thresholds="global"`` (default) uses the raw maximum with one cutoff for every pair, as the reference
code does (it compares the kind-averaged z-score with one normal quantile). ``"pair"`` first subtracts a
per-(y, z) threshold, the clean (1 − fpr) quantile. It is not from the reference, and on the embedded data
it scored 0.01 AUROC lower on PGD. Either way, one global threshold is then calibrated to the target FPR.

The single-shot variant (``noise=False``, kind ``odds-single``) needs no queries: it z-scores the log-odds
f_z − f_y of the row itself against clean class-conditional statistics. It only sees how unusual the
logits are for their predicted class, not how they react to noise, and is weaker. In Roth et al. the
noise reaction is the signal.

Correction of flagged rows: ``argmax`` picks the class z whose feature is largest, the class the noise
pulls towards. ``logistic`` fits, per predicted class y, a multinomial logistic regression from the
features to the true label on attacked training rows predicted y. It falls back to ``argmax`` for classes
with too few rows. ``reference`` is Roth et al.'s classifier. Per predicted class y, a multinomial logistic
regression maps the raw (not z-scored) draw average of each noise kind, E × C features, to the true label.
It learns from successful attacks only (true label ≠ y), so it never answers y. A class seen with one label
answers that label, and a class with no rows uses ``argmax``. ``logistic`` and ``reference`` store a C × C
(× E) matrix per class and are refused above 100 classes.

Statistics are sums grouped by class in one pass (sorted rows, `np.add.reduceat`): no loop over samples
or class pairs, and no torch. The score and the correction are written once, on the array API, in
`logitguard.defenses.math.odds` (the producer's mirror runs the same functions on torch tensors).

Modules: `detector` (`OddsTest`, `SingleShotOddsTest`), `kinds` (the noise kind of each query and the
query groups), `fitting` (class moments, pair quantiles, the correction classifiers), `corrector`
(`OddsCorrector`, the odds test as a corrector).
"""

from __future__ import annotations

from .corrector import OddsCorrector
from .detector import AGGREGATIONS, CORRECTIONS, MAX_LOGISTIC_CLASSES, OddsTest, SingleShotOddsTest
from .kinds import noise_kinds_from_metadata

__all__ = ["AGGREGATIONS", "CORRECTIONS", "MAX_LOGISTIC_CLASSES", "OddsCorrector", "OddsTest", "SingleShotOddsTest",
           "noise_kinds_from_metadata"]
