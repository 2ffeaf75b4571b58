"""Differentiable mirrors of logitguard's saved defenses, for attacks that know the defense.

A mirror is a torch module built from a defense's saved file through the core loaders (nothing is
unpickled): it holds the fitted arrays as torch buffers and calls the core's own math
(`logitguard.defenses.math`, written once on the array API), so it returns the core's scores and labels
and is differentiable w.r.t. its inputs:

- `DetectorMirror`: ``forward(logits, noisy) -> scores (B,)`` (higher = adversarial), ``flags``; mirrors of
  detectors that read another table column (``input_column``: ``features`` for `KDensityMirror`,
  ``insen`` for `InsenMirror`) take its rows as a third input, ``forward(logits, noisy, features)``, and are
  differentiable in them; `DetectorMirror.score` calls either kind;
- `CorrectorMirror`: ``forward -> class scores (B, C)`` for gradients, ``labels -> (B,)`` exact;
- `producers.threat.pipeline.PipelineMirror`: a `GatedDefense` of two mirrors with its ``on_flag`` policy.

Inputs are logits (B, C) and, where ``needs_noise``, noise queries (B, K, C): any float dtype, any
device (buffers move to the input's device on first use). Scores are float64 as in the core, except the
logit corrector's float32 network. What cannot carry a gradient: the predicted class that selects the
odds statistics and the K-density rows, the exact SVM's one-vs-one vote (its soft vote, the math's
documented surrogate, stands in), flags and labels.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from logitguard.defenses.corrector import WEIGHT_KEYS, LogitCorrector
from logitguard.defenses.detectors import (Detector, InsenDetector, KDensityDetector, LearnedDetector, OddsCorrector,
                                           OddsTest, load_detector)
from logitguard.defenses.gated import load_corrector
from logitguard.defenses.decision import ABSTAIN, flag
from logitguard.defenses.math import NEG
from logitguard.defenses.math.baselines import SCORES as _BASELINE_SCORES
from logitguard.defenses.math.corrector import corrector_logits
from logitguard.defenses.math.insen import insen_score
from logitguard.defenses.math.kdensity import kdensity_score
from logitguard.defenses.math.learned import learned_features, mlp_score
from logitguard.defenses.math.odds import OddsArrays, log_odds_changes, odds_class_scores, odds_features, odds_score
from logitguard.defenses.math.svm import (ovr_labels, ovr_scores, svm_decision, svm_votes, vote_labels,
                                          vote_matrices)
from logitguard.defenses.svm import SVMCorrector

from ..errors import ProducerError

BASELINES = tuple(_BASELINE_SCORES)
__all__ = ["ABSTAIN", "BASELINES", "NEG", "CorrectorMirror", "DetectorMirror", "load_corrector_mirror",
           "load_detector_mirror", "mirror_corrector", "mirror_detector"]


# -- shared plumbing --------------------------------------------------------------------------------------


class _Mirror(nn.Module):
    """Fitted arrays as buffers, input checks and device following shared by every mirror."""

    needs_noise: bool = False

    def __init__(self, num_classes: int | None) -> None:
        super().__init__()
        self.num_classes = num_classes

    def _arrays(self, *, keep_dtype: bool = False, **arrays: Any) -> None:
        """Register fitted NumPy arrays as buffers (floats as float64 unless `keep_dtype`; None is skipped)."""
        for name, value in arrays.items():
            if value is None:
                continue
            value = np.asarray(value)
            floats = value.dtype.kind == "f" and not keep_dtype
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value, np.float64 if floats else None)))

    def _check(self, logits: Tensor, noisy: Tensor | None) -> None:
        if logits.ndim != 2 or (self.num_classes is not None and logits.shape[1] != self.num_classes):
            raise ProducerError(f"{type(self).__name__} needs logits (B, {self.num_classes or 'C'}), got "
                                f"{tuple(logits.shape)}")
        if self.needs_noise:
            if noisy is None:
                raise ProducerError(f"{type(self).__name__} needs noise queries (B, K, C)")
            if noisy.ndim != 3 or noisy.shape[0] != logits.shape[0] or noisy.shape[2] != logits.shape[1]:
                raise ProducerError(f"noise queries must have shape (B, K, C) = ({logits.shape[0]}, K, "
                                    f"{logits.shape[1]}), got {tuple(noisy.shape)}")
        buffer = next(self.buffers(), None)
        if buffer is not None and buffer.device != logits.device:
            self.to(logits.device)


# -- detectors ------------------------------------------------------------------------------------------


class DetectorMirror(_Mirror):
    """A detector's score as a torch function. Attributes: ``kind``, ``needs_noise``, ``threshold``,
    ``input_column`` (None, or the table column whose rows `forward` takes as its third input)."""

    input_column: str | None = None

    def __init__(self, kind: str, threshold: float, num_classes: int | None = None, *,
                 needs_noise: bool = False) -> None:
        super().__init__(num_classes)
        self.kind, self.threshold, self.needs_noise = kind, float(threshold), needs_noise

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Scores (B,) float64, equal to the core detector's `score`; higher = more likely adversarial."""
        raise NotImplementedError

    def score(self, logits: Tensor, noisy: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """`forward`, passing `features` (B, F) on to mirrors with an `input_column` (the others ignore it)."""
        return self(logits, noisy) if self.input_column is None else self(logits, noisy, features)

    @torch.no_grad()
    def flags(self, logits: Tensor, noisy: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Flags (B,) bool by the core's one rule (`logitguard.defenses.decision.flag`: NaN is flagged)."""
        return flag(self.score(logits, noisy, features), self.threshold)

    def _check_features(self, logits: Tensor, features: Tensor | None, width: int) -> Tensor:
        """`features` (B, width), checked against the logits' rows."""
        if features is None:
            raise ProducerError(f"{type(self).__name__} reads the {self.input_column!r} column: pass its rows "
                                f"(B, {width}) as the third input")
        if features.ndim != 2 or features.shape != (logits.shape[0], width):
            raise ProducerError(f"{self.input_column!r} rows must have shape (B, F) = ({logits.shape[0]}, {width}), "
                                f"got {tuple(features.shape)}")
        return features

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, threshold={self.threshold:.6g}"


class BaselineMirror(DetectorMirror):
    """msp, maxlogit, energy or nonme: a fixed function of the logits."""

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        self._check(logits, noisy)
        return _BASELINE_SCORES[self.kind](logits)


class LearnedMirror(DetectorMirror):
    """The learned detector's MLP on `logitguard.defenses.math.learned.learned_features`."""

    def __init__(self, detector: LearnedDetector) -> None:
        super().__init__(detector.kind, detector.threshold_, None, needs_noise=detector.noise)
        self.ranked = detector.ranked
        self._arrays(center=detector.center_, scale=detector.scale_, w1=detector.w1_, b1=detector.b1_,
                     w2=detector.w2_, b2=detector.b2_)

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        self._check(logits, noisy)
        x = learned_features(logits, noisy if self.needs_noise else None, ranked=self.ranked)
        if x.shape[1] != self.center.shape[0]:
            raise ProducerError(f"the logits give {x.shape[1]} features; this detector was fitted on "
                                f"{self.center.shape[0]}")
        return mlp_score(x, self.center, self.scale, self.w1, self.b1, self.w2, self.b2)


class _OddsArrays(_Mirror):
    """An odds test's `OddsArrays` as buffers, and its log-odds changes and features."""

    def __init__(self, odds: OddsTest) -> None:
        arrays = odds.odds_arrays()
        super().__init__(arrays.mean.shape[0])
        self.needs_noise, self.queries = odds.noise, len(odds.query_group_)
        self._arrays(**arrays._asdict())

    def arrays(self) -> OddsArrays:
        return OddsArrays(*(getattr(self, name, None) for name in OddsArrays._fields))

    def changes(self, logits: Tensor, noisy: Tensor | None) -> tuple[Tensor, Tensor, Tensor, OddsArrays]:
        """Predicted classes y (B,), changes g (B, K, C), features (B, C) (-inf at y) and the arrays."""
        self._check(logits, noisy)
        y, g = log_odds_changes(logits, noisy if self.needs_noise else None)
        if g.shape[1] != self.queries:
            raise ProducerError(f"got {g.shape[1]} noise queries; this detector was fitted on {self.queries}")
        arrays = self.arrays()
        return y, g, odds_features(y, g, arrays), arrays


class OddsMirror(DetectorMirror):
    """The odds test (``odds``, ``odds-single``): max over z ≠ y of the features minus the pair thresholds."""

    def __init__(self, odds: OddsTest) -> None:
        super().__init__(odds.kind, odds.threshold_, odds.mean_.shape[0], needs_noise=odds.noise)
        self.odds = _OddsArrays(odds)

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        y, _, features, arrays = self.odds.changes(logits, noisy)
        return odds_score(y, features, arrays)


class KDensityMirror(DetectorMirror):
    """K-density (`logitguard.defenses.math.kdensity`), differentiable in the features (the predicted class,
    which picks the training rows, carries no gradient)."""

    input_column = "features"

    def __init__(self, detector: KDensityDetector) -> None:
        super().__init__(detector.kind, detector.threshold_, getattr(detector, "n_classes_", None))
        self.sigma2 = float(detector.sigma2)
        train = np.asarray(detector.train_features_, dtype=np.float64)
        self._arrays(train_features=train, train_square=(train ** 2).sum(axis=1),
                     train_labels=np.asarray(detector.train_labels_, dtype=np.int64),
                     counts=np.asarray(detector.class_counts_, dtype=np.int64))

    def forward(self, logits: Tensor, noisy: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Scores (B,) float64, equal to the core's `score_samples` up to float rounding."""
        self._check(logits, noisy)
        f = self._check_features(logits, features, self.train_features.shape[1])
        return kdensity_score(f, logits.argmax(dim=1), self.train_features, self.train_square, self.train_labels,
                              self.counts, self.sigma2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sigma2={self.sigma2:.6g}, train_rows={len(self.train_features)}"


class InsenMirror(DetectorMirror):
    """The insen detector's logistic regression on standardised InSen statistics (B, 5). An attack computes
    the statistics with `producers.models.insen.insen_stats(model, x, create_graph=True)`, so that their gradient
    with respect to the image (a second derivative of the model's loss) reaches it."""

    input_column = "insen"

    def __init__(self, detector: InsenDetector) -> None:
        super().__init__(detector.kind, detector.threshold_, getattr(detector, "n_classes_", None))
        self._arrays(center=detector.center_, scale=detector.scale_, coef=detector.coef_,
                     intercept=detector.intercept_)

    def forward(self, logits: Tensor, noisy: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Scores (B,) float64: the regression's logit for "attacked", as the core's `score_samples`."""
        self._check(logits, noisy)
        s = self._check_features(logits, features, self.center.shape[0])
        return insen_score(s, self.center, self.scale, self.coef, self.intercept)


# -- correctors ----------------------------------------------------------------------------------------


class CorrectorMirror(_Mirror):
    """A corrector: differentiable class scores (`forward`) and the core's exact labels (`labels`)."""

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Class scores (B, C) whose gradients guide an attack (argmax = `labels` up to exact ties)."""
        raise NotImplementedError

    def labels(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Corrected labels (B,) int64, equal to the core's `predict`."""
        raise NotImplementedError


class LogitCorrectorMirror(CorrectorMirror):
    """The logit corrector's network C → D → C (dropout is off at inference), in its own float32."""

    def __init__(self, corrector: LogitCorrector) -> None:
        corrector._check_fitted()
        super().__init__(corrector.n_classes_)
        w1, b1, w2, b2 = (corrector.weights_[key] for key in WEIGHT_KEYS)
        self._arrays(keep_dtype=True, w1t=np.asarray(w1).T, b1=b1, w2t=np.asarray(w2).T, b2=b2)

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Corrected logits (B, C) in the network's dtype (float32), as the core's `correct`."""
        self._check(logits, noisy)
        return corrector_logits(logits, self.w1t, self.b1, self.w2t, self.b2)

    @torch.no_grad()
    def labels(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        return self(logits, noisy).argmax(dim=1)


class SVMMirror(CorrectorMirror):
    """The RBF SVM corrector, either method (`logitguard.defenses.math.svm`): its exact decision values and
    labels, plus class scores for gradients: ``exact``, the soft vote at ``temperature`` T; ``nystroem``,
    the decision values (classes never seen at `NEG`)."""

    def __init__(self, svm: SVMCorrector, *, temperature: float = 0.25) -> None:
        svm._check_fitted()
        super().__init__(svm.n_classes_)
        if not temperature > 0:
            raise ProducerError(f"temperature must be > 0, got {temperature!r}")
        self.method = svm.method_
        self.temperature, self.gamma = float(temperature), float(svm.gamma_)
        self._arrays(center=svm.center_, scale=svm.scale_, support_vectors=svm.support_vectors_,
                     sv_square=(svm.support_vectors_ ** 2).sum(axis=1), coef=svm.coef_, intercept=svm.intercept_,
                     classes=np.asarray(svm.classes_, dtype=np.int64))
        if self.method == "exact":
            first, second = vote_matrices(np.asarray(svm.pairs_, dtype=np.int64), self.classes.numpy(),
                                          self.num_classes, np)
            self._arrays(vote_first=first, vote_second=second)

    def decision(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Decision values float64: exact (B, pairs), positive favours the pair's first class; nystroem
        (B, seen classes)."""
        self._check(logits, noisy)
        return svm_decision(logits, self.center, self.scale, self.support_vectors, self.sv_square, self.coef,
                            self.intercept, self.gamma)

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Class scores (B, C) float64: soft votes (exact) or decision values (nystroem)."""
        decision = self.decision(logits, noisy)
        if self.method == "nystroem":
            return ovr_scores(decision, self.classes, self.num_classes)
        return svm_votes(decision, self.vote_first, self.vote_second, self.temperature)

    @torch.no_grad()
    def labels(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """The core's labels: the exact vote (ties to the lowest class) or the one-vs-rest argmax."""
        decision = self.decision(logits, noisy)
        if self.method == "nystroem":
            return ovr_labels(decision, self.classes)
        return vote_labels(svm_votes(decision, self.vote_first, self.vote_second))

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


class OddsCorrectorMirror(CorrectorMirror):
    """An odds detector's correction rule, as `OddsTest.correct` (`logitguard.defenses.math.odds`): class
    scores with `NEG` where the exact rule has -inf, labels from the exact scores."""

    def __init__(self, odds: OddsTest) -> None:
        super().__init__(odds.mean_.shape[0])
        self.needs_noise, self.correction = odds.noise, odds.correction
        self.odds = _OddsArrays(odds)

    def _scores(self, logits: Tensor, noisy: Tensor | None, *, soft: bool) -> Tensor:
        y, g, features, arrays = self.odds.changes(logits, noisy)
        return odds_class_scores(y, g, features, arrays, self.correction, soft=soft)

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Class scores (B, C) float64, finite everywhere."""
        return self._scores(logits, noisy, soft=True)

    @torch.no_grad()
    def labels(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        return self._scores(logits, noisy, soft=False).argmax(dim=1)

    def extra_repr(self) -> str:
        return f"correction={self.correction!r}"


# -- builders --------------------------------------------------------------------------------------------


def mirror_detector(detector: Detector) -> DetectorMirror:
    """The mirror of a fitted core detector."""
    if not hasattr(detector, "threshold_"):
        raise ProducerError(f"this {type(detector).__name__} is not fitted yet")
    for cls, mirror in ((OddsTest, OddsMirror), (LearnedDetector, LearnedMirror), (KDensityDetector, KDensityMirror),
                        (InsenDetector, InsenMirror)):
        if isinstance(detector, cls):
            return mirror(detector)
    if detector.kind in BASELINES:
        return BaselineMirror(detector.kind, detector.threshold_)
    raise ProducerError(f"no mirror for detector kind {detector.kind!r}")


def mirror_corrector(corrector: Any, *, temperature: float = 0.25) -> CorrectorMirror:
    """The mirror of a fitted corrector: `LogitCorrector`, `SVMCorrector` (soft-vote `temperature`) or
    `OddsCorrector` / `OddsTest` (its correction rule)."""
    if isinstance(corrector, LogitCorrector):
        return LogitCorrectorMirror(corrector)
    if isinstance(corrector, SVMCorrector):
        return SVMMirror(corrector, temperature=temperature)
    if isinstance(corrector, OddsCorrector):
        corrector = corrector.odds
    if isinstance(corrector, OddsTest):
        return OddsCorrectorMirror(corrector)
    raise ProducerError(f"no mirror for a {type(corrector).__name__} corrector")


def load_detector_mirror(path: str | os.PathLike) -> DetectorMirror:
    """The mirror of a detector file (`logitguard.defenses.detectors.load_detector`)."""
    return mirror_detector(load_detector(path))


def load_corrector_mirror(path: str | os.PathLike, *, temperature: float = 0.25) -> CorrectorMirror:
    """The mirror of a corrector file (`logitguard.defenses.gated.load_corrector`: .pt, SVM or odds .npz)."""
    return mirror_corrector(load_corrector(path), temperature=temperature)
