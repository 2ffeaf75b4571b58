"""Differentiable mirrors of logitguard's saved defenses, for attacks that know the defense.

A mirror is a torch module built from a defense's saved file through the core loaders (nothing is
unpickled); it returns the core's scores and labels and is differentiable w.r.t. its inputs:

- `DetectorMirror`: ``forward(logits, noisy) -> scores (B,)`` (higher = adversarial), ``flags``; mirrors of
  detectors that read another table column (``input_column``: ``features`` for `KDensityMirror`,
  ``insen`` for `InsenMirror`) take its rows as a third input, ``forward(logits, noisy, features)``, and are
  differentiable in them; `DetectorMirror.score` calls either kind;
- `CorrectorMirror`: ``forward -> class scores (B, C)`` for gradients, ``labels -> (B,)`` exact;
- `PipelineMirror`: a `GatedDefense` with its ``on_flag`` policy; ``decide -> (B,)``, ABSTAIN = -1.

Inputs are logits (B, C) and, where ``needs_noise``, noise queries (B, K, C): any float dtype, any
device (buffers move to the input's device on first use). The core computes in float64 NumPy, so the
mirrors do too and return float64, except the logit corrector, whose float32 network returns float32
as in the core. What cannot carry a gradient: the predicted class that selects the odds statistics,
the exact SVM's one-vs-one vote (its soft vote stands in), flags and labels.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from logitguard.defenses.corrector import LogitCorrector
from logitguard.defenses.gated import ABSTAIN, ON_FLAG, load_corrector
from logitguard.defenses.detectors import (Detector, InsenDetector, KDensityDetector, LearnedDetector, OddsCorrector,
                                           OddsTest, load_detector)
from logitguard.defenses.svm import SVMCorrector

from ..errors import ProducerError

BASELINES = ("msp", "maxlogit", "energy", "nonme")
NEG = -1e9  # finite stand-in for -inf in differentiable class scores (the odds test's own class)


# -- score functions (float64, mirroring logitguard.defenses.detectors.baselines) -------------------------------


def _shifted(logits: Tensor) -> Tensor:
    """logits − row max in the input dtype, then float64: the core subtracts in float32 before `exp`."""
    return (logits - logits.max(dim=1, keepdim=True).values).double()


def msp_score(logits: Tensor) -> Tensor:
    """Negated maximum softmax probability (B,)."""
    return -torch.softmax(_shifted(logits), dim=1).max(dim=1).values


def max_logit_score(logits: Tensor) -> Tensor:
    """Negated maximum logit (B,)."""
    return -logits.double().max(dim=1).values


def energy_score(logits: Tensor) -> Tensor:
    """-logsumexp(logits) (B,)."""
    z = logits.double()
    m = z.max(dim=1).values
    return -(m + torch.log(torch.exp(z - m[:, None]).sum(dim=1)))


def nonme_score(logits: Tensor) -> Tensor:
    """Negated entropy (B,) of the softmax without its largest entry, renormalised.

    Computed as a log-softmax over the other classes, so no probability is divided or logged after it
    underflows: gradients stay finite on very peaked logits, where float32 (and the core's float64 ratio
    once the gaps pass ~700) lose the tail. Equal to the core wherever the core's softmax does not underflow.
    """
    s = _shifted(logits)
    top = F.one_hot(s.argmax(dim=1), s.shape[1]).bool()
    log_q = torch.log_softmax(s.masked_fill(top, -torch.inf), dim=1).masked_fill(top, 0.0)
    return (log_q.exp().masked_fill(top, 0.0) * log_q).sum(dim=1)


_BASELINE_SCORES = {"msp": msp_score, "maxlogit": max_logit_score, "energy": energy_score, "nonme": nonme_score}


# -- shared plumbing --------------------------------------------------------------------------------------


class _Mirror(nn.Module):
    """Input checks and device following shared by every mirror."""

    needs_noise: bool = False

    def __init__(self, num_classes: int | None) -> None:
        super().__init__()
        self.num_classes = num_classes

    def _arrays(self, **arrays: np.ndarray) -> None:
        """Register fitted NumPy arrays as buffers (float64 for floats)."""
        for name, value in arrays.items():
            value = np.asarray(value)
            value = np.ascontiguousarray(value, dtype=np.float64 if value.dtype.kind == "f" else None)
            self.register_buffer(name, torch.from_numpy(value))

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
        """Flags (B,) bool: score > threshold, as the core's `predict`."""
        return self.score(logits, noisy, features) > self.threshold

    def _check_features(self, logits: Tensor, features: Tensor | None, width: int) -> Tensor:
        """`features` as float64 (B, width), checked against the logits' rows."""
        if features is None:
            raise ProducerError(f"{type(self).__name__} reads the {self.input_column!r} column: pass its rows "
                                f"(B, {width}) as the third input")
        if features.ndim != 2 or features.shape != (logits.shape[0], width):
            raise ProducerError(f"{self.input_column!r} rows must have shape (B, F) = ({logits.shape[0]}, {width}), "
                                f"got {tuple(features.shape)}")
        return features.double()

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, threshold={self.threshold:.6g}"


class BaselineMirror(DetectorMirror):
    """msp, maxlogit, energy or nonme: a fixed function of the logits."""

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        self._check(logits, noisy)
        return _BASELINE_SCORES[self.kind](logits)


class LearnedMirror(DetectorMirror):
    """The learned detector's MLP. Features (B, F): logits, softmax, logits sorted descending, and for
    ``learned-noisy`` the mean and population std over queries of noisy − logits."""

    def __init__(self, detector: LearnedDetector) -> None:
        super().__init__(detector.kind, detector.threshold_, None, needs_noise=detector.noise)
        self._arrays(center=detector.center_, scale=detector.scale_, w1=detector.w1_, b1=detector.b1_,
                     w2=detector.w2_, b2=detector.b2_)

    def features(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Unscaled features (B, F) float64."""
        z = logits.double()
        parts = [z, torch.softmax(z, dim=1), torch.sort(z, dim=1, descending=True).values]
        if self.needs_noise:
            change = noisy.double() - z[:, None, :]
            mean = change.mean(dim=1)
            var = (change - mean[:, None, :]).square().mean(dim=1)
            # sqrt'(0) is infinite: identical queries (or K = 1) would turn the gradient into NaN.
            parts += [mean, torch.where(var > 0, var.clamp_min(1e-300).sqrt(), 0.0)]
        return torch.cat(parts, dim=1)

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        self._check(logits, noisy)
        x = self.features(logits, noisy)
        if x.shape[1] != self.center.shape[0]:
            raise ProducerError(f"the logits give {x.shape[1]} features; this detector was fitted on "
                                f"{self.center.shape[0]}")
        hidden = torch.relu((x - self.center) / self.scale @ self.w1 + self.b1)
        return (hidden @ self.w2 + self.b2)[:, 0]


class _OddsFeatures(_Mirror):
    """The odds test's z-scored log-odds changes, averaged over queries (see logitguard.defenses.detectors.odds)."""

    def __init__(self, odds: OddsTest) -> None:
        odds._check_moments()
        if getattr(odds, "aggregation", "query") != "query" and odds.noise:
            raise ProducerError(f"the odds mirror z-scores each query; aggregation={odds.aggregation!r} is not mirrored")
        super().__init__(odds.mean_.shape[0])
        self.needs_noise = odds.noise
        self.queries = odds.mean_.shape[1]
        self._arrays(mean=odds.mean_, inverse_scale=odds._inverse_scale)

    def odds_features(self, logits: Tensor, noisy: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Predicted classes y (B,), features (B, C) with -inf at z = y, and the mask of y (B, C) bool."""
        self._check(logits, noisy)
        z = logits.double()
        y = z.argmax(dim=1)
        g = noisy.double() - z[:, None, :] if self.needs_noise else z[:, None, :]
        if g.shape[1] != self.queries:
            raise ProducerError(f"got {g.shape[1]} noise queries; this detector was fitted on {self.queries}")
        g = g - g.gather(2, y[:, None, None].expand(-1, g.shape[1], 1))
        features = ((g - self.mean[y]) * self.inverse_scale[y]).sum(dim=1)
        own = F.one_hot(y, z.shape[1]).bool()
        return y, features.masked_fill(own, -torch.inf), own


class OddsMirror(DetectorMirror):
    """The odds test (``odds``, ``odds-single``): max over z ≠ y of the features minus the pair thresholds."""

    def __init__(self, odds: OddsTest) -> None:
        super().__init__(odds.kind, odds.threshold_, odds.mean_.shape[0], needs_noise=odds.noise)
        self.odds = _OddsFeatures(odds)
        self._arrays(pair_threshold=odds.pair_threshold_)

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        self._check(logits, noisy)
        y, features, _ = self.odds.odds_features(logits, noisy)
        return (features - self.pair_threshold[y]).max(dim=1).values


class KDensityMirror(DetectorMirror):
    """K-density (`logitguard.defenses.detectors.kdensity`): −log of the mean Gaussian kernel between the features and
    the kept training features of the predicted class, differentiable in the features (the predicted class,
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
        y = logits.argmax(dim=1)
        dist = (f * f).sum(dim=1)[:, None] + self.train_square[None, :] - 2.0 * f @ self.train_features.T
        present = self.counts > 0
        mine = (self.train_labels[None, :] == y[:, None]) | ~present[y][:, None]
        logk = (-dist.clamp_min(0.0) / self.sigma2).masked_fill(~mine, -torch.inf)
        count = torch.where(present[y], self.counts[y], len(self.train_features)).double()
        return count.log() - torch.logsumexp(logk, dim=1)

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
        return (s - self.center) / self.scale @ self.coef + self.intercept[0]


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
    """The logit corrector's MLP C → D → C (dropout is off at inference), in its own float32."""

    def __init__(self, corrector: LogitCorrector) -> None:
        corrector._check_fitted()
        super().__init__(corrector.n_classes_)
        first, last = (m for m in corrector.model_ if isinstance(m, nn.Linear))
        for name, tensor in {"w1": first.weight, "b1": first.bias, "w2": last.weight, "b2": last.bias}.items():
            self.register_buffer(name, tensor.detach().cpu().clone())

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Corrected logits (B, C) in the network's dtype (float32), as the core's `correct`."""
        self._check(logits, noisy)
        hidden = torch.relu(F.linear(logits.to(self.w1.dtype), self.w1, self.b1))
        return F.linear(hidden, self.w2, self.b2)

    @torch.no_grad()
    def labels(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        return self(logits, noisy).argmax(dim=1)


class SVMMirror(CorrectorMirror):
    """The RBF SVM corrector, either method: its exact decision values and labels, plus class scores for
    gradients.

    ``exact`` (one-vs-one): ``temperature`` T sets a soft vote, class c gets Σ over its pairs of
    sigmoid(±decision / T); classes the SVM never saw get no votes. ``nystroem`` (one-vs-rest): the class
    scores are the decision values themselves (classes never seen at `NEG`), and labels their argmax.
    """

    def __init__(self, svm: SVMCorrector, *, temperature: float = 0.25) -> None:
        svm._check_fitted()
        super().__init__(svm.n_classes_)
        if not temperature > 0:
            raise ProducerError(f"temperature must be > 0, got {temperature!r}")
        self.method = svm.method_
        self.temperature, self.gamma = float(temperature), float(svm.gamma_)
        classes = np.asarray(svm.classes_, dtype=np.int64)
        self._arrays(center=svm.center_, scale=svm.scale_, support_vectors=svm.support_vectors_,
                     sv_square=(svm.support_vectors_ ** 2).sum(axis=1), coef=svm.coef_, intercept=svm.intercept_,
                     classes=classes)
        if self.method == "exact":
            first, second = classes[svm.pairs_[0]], classes[svm.pairs_[1]]
            eye = np.eye(self.num_classes)
            self._arrays(pairs=np.asarray(svm.pairs_, dtype=np.int64), vote_first=eye[first],
                         vote_second=eye[second])

    def decision(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Decision values float64: exact (B, pairs), positive favours the pair's first class; nystroem
        (B, seen classes)."""
        self._check(logits, noisy)
        x = (logits.double() - self.center) / self.scale
        dist = (x * x).sum(dim=1)[:, None] + self.sv_square[None, :] - 2.0 * x @ self.support_vectors.T
        return torch.exp(-self.gamma * dist.clamp_min(0.0)) @ self.coef + self.intercept

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Class scores (B, C) float64: soft votes (exact) or decision values (nystroem)."""
        decision = self.decision(logits, noisy)
        if self.method == "nystroem":
            scores = decision.new_full((len(decision), self.num_classes), NEG)
            return scores.index_copy(1, self.classes, decision)
        win = torch.sigmoid(decision / self.temperature)
        return win @ self.vote_first + (1.0 - win) @ self.vote_second

    @torch.no_grad()
    def labels(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """The core's labels. Exact: libsvm's vote, a pair goes to its first class iff decision > 0, ties to
        the lowest class; nystroem: the class of the largest decision value (first on ties, as NumPy)."""
        decision = self.decision(logits, noisy)
        if self.method == "nystroem":
            return self.classes[decision.argmax(dim=1)]
        winners = torch.where(decision > 0, self.pairs[0], self.pairs[1])
        k = len(self.classes)
        votes = F.one_hot(winners, k).sum(dim=1)
        # argmax's tie rule is documented, but an explicit key keeps "lowest class wins" on every device.
        key = votes * k + torch.arange(k - 1, -1, -1, device=votes.device)
        return self.classes[key.argmax(dim=1)]

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


class OddsCorrectorMirror(CorrectorMirror):
    """An odds detector's correction rule, as `OddsTest.correct`.

    ``argmax``: class scores are the features with -inf at y replaced by `NEG`. ``logistic``: rows whose
    predicted class has a fitted model get its logits (unseen classes at `NEG`), others the argmax scores.
    """

    def __init__(self, odds: OddsTest) -> None:
        if odds.correction not in ("argmax", "logistic"):
            raise ProducerError(f"correction={odds.correction!r} is not mirrored (only 'argmax' and 'logistic')")
        super().__init__(odds.mean_.shape[0])
        self.needs_noise, self.correction = odds.noise, odds.correction
        self.odds = _OddsFeatures(odds)
        if self.correction == "logistic":
            bias = odds.logistic_bias_
            self._arrays(weights=odds.logistic_weights_, bias=np.where(np.isfinite(bias), bias, NEG),
                         seen=np.isfinite(bias), fitted=np.asarray(odds.logistic_fitted_, dtype=bool))

    def _scores(self, logits: Tensor, noisy: Tensor | None, *, exact: bool) -> Tensor:
        self._check(logits, noisy)
        y, features, own = self.odds.odds_features(logits, noisy)
        fallback = features if exact else features.masked_fill(own, NEG)
        if self.correction == "argmax":
            return fallback
        x = features.masked_fill(own, 0.0)
        scores = torch.einsum("nc,nlc->nl", x, self.weights[y]) + self.bias[y]
        if exact:
            scores = scores.masked_fill(~self.seen[y], -torch.inf)
        return torch.where(self.fitted[y][:, None], scores, fallback)

    def forward(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        """Class scores (B, C) float64, finite everywhere."""
        return self._scores(logits, noisy, exact=False)

    @torch.no_grad()
    def labels(self, logits: Tensor, noisy: Tensor | None = None) -> Tensor:
        return self._scores(logits, noisy, exact=True).argmax(dim=1)

    def extra_repr(self) -> str:
        return f"correction={self.correction!r}"


# -- pipelines -------------------------------------------------------------------------------------------


class PipelineOutput(NamedTuple):
    """What a pipeline sees: the model's logits (B, C), the detector's score (B,) and threshold (None
    without a detector: every row is flagged), and the corrector's class scores (B, C) (None without)."""

    logits: Tensor
    score: Tensor | None
    threshold: float | None
    corrected: Tensor | None


class PipelineMirror(nn.Module):
    """`GatedDefense` as a torch module: flagged rows are corrected, rejected, or kept when the corrector
    agrees with the model (`on_flag` = "correct", "reject", "agree"); other rows keep the argmax.

    No detector: every row is flagged. No detector and no corrector: the bare model.
    """

    def __init__(self, detector: DetectorMirror | None, corrector: CorrectorMirror | None,
                 on_flag: str = "correct") -> None:
        super().__init__()
        if on_flag not in ON_FLAG:
            raise ProducerError(f"on_flag must be one of {', '.join(ON_FLAG)}; got {on_flag!r}")
        if corrector is None and detector is not None and on_flag != "reject":
            raise ProducerError(f"on_flag={on_flag!r} needs a corrector")
        self.detector, self.corrector, self.on_flag = detector, corrector, on_flag
        self.needs_noise = any(m is not None and m.needs_noise for m in (detector, corrector))
        # The table column the detector reads besides the logits: an attack computes it from the model and x.
        self.input_column = None if detector is None else detector.input_column

    def forward(self, logits: Tensor, noisy: Tensor | None = None, features: Tensor | None = None) -> PipelineOutput:
        """`features`: the detector's `input_column` rows (B, F), for detectors that read one."""
        score = None if self.detector is None else self.detector.score(logits, noisy, features)
        corrected = None if self.corrector is None else self.corrector(logits, noisy)
        threshold = None if self.detector is None else self.detector.threshold
        return PipelineOutput(logits, score, threshold, corrected)

    @torch.no_grad()
    def flagged(self, logits: Tensor, noisy: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Flags (B,) bool; all True without a detector."""
        if self.detector is None:
            return torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        return self.detector.flags(logits, noisy, features)

    @torch.no_grad()
    def decide(self, logits: Tensor, noisy: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Final labels (B,) int64, `ABSTAIN` (-1) for rejected rows, equal to the core's `GatedDefense` (for
        a detector with an `input_column`, which the core's gated defense refuses: the same rule)."""
        model = logits.argmax(dim=1)
        if self.detector is None and self.corrector is None:
            return model
        flagged = self.flagged(logits, noisy, features)
        if self.on_flag == "reject":
            return torch.where(flagged, ABSTAIN, model)
        corrected = self.corrector.labels(logits, noisy)
        if self.on_flag == "correct":
            return torch.where(flagged, corrected, model)
        return torch.where(flagged & (corrected != model), ABSTAIN, model)  # "agree"

    def extra_repr(self) -> str:
        return f"on_flag={self.on_flag!r}"


# -- builders --------------------------------------------------------------------------------------------


def mirror_detector(detector: Detector) -> DetectorMirror:
    """The mirror of a fitted core detector."""
    if not hasattr(detector, "threshold_"):
        raise ProducerError(f"this {type(detector).__name__} is not fitted yet")
    if isinstance(detector, OddsTest):
        return OddsMirror(detector)
    if isinstance(detector, LearnedDetector):
        return LearnedMirror(detector)
    if isinstance(detector, KDensityDetector):
        return KDensityMirror(detector)
    if isinstance(detector, InsenDetector):
        return InsenMirror(detector)
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


def load_pipeline_mirror(spec: Any, *, temperature: float = 0.25) -> PipelineMirror:
    """The mirror of a pipeline spec: anything with ``detector`` and ``corrector`` (paths or None) and
    ``on_flag`` (a `logitguard.defenses.pipelines.PipelineSpec`)."""
    detector = None if spec.detector is None else load_detector_mirror(spec.detector)
    corrector = None if spec.corrector is None else load_corrector_mirror(spec.corrector, temperature=temperature)
    return PipelineMirror(detector, corrector, getattr(spec, "on_flag", "correct"))
