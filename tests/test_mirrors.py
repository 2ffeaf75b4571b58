"""Differentiable mirrors equal the core defenses they were loaded from, and their gradients are finite.

Every defense kind is fitted quickly on a slice of the embedded Fashion-MNIST logits, saved, and mirrored
from its file; the mirror must give the core's scores (|diff| <= 1e-5 x max(1, |score|): learned and odds
scores reach tens), flags and labels on test rows from clean, PGD and C&W.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from logitguard import read_table
from logitguard.defenses.corrector import LogitCorrector
from logitguard.defenses.gated import GatedDefense, load_corrector
from logitguard.defenses.detectors import load_detector, make_detector
from logitguard.defenses.svm import SVMCorrector
from producers.threat import ABSTAIN, PipelineMirror, load_corrector_mirror, load_detector_mirror, load_pipeline_mirror

DATA = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"

DETECTORS = {  # file stem: (kind, params)
    "msp": ("msp", {}), "maxlogit": ("maxlogit", {}), "energy": ("energy", {}), "nonme": ("nonme", {}),
    "learned": ("learned", {"max_iter": 30}), "learned-noisy": ("learned-noisy", {"max_iter": 30}),
    "learned-ranked": ("learned-ranked", {"max_iter": 30}),
    "odds-pair-logistic": ("odds", {"thresholds": "pair", "correction": "logistic"}),
    "odds-argmax": ("odds", {}),
    # min_rows=400: some classes pool their moments and two fall back from logistic to argmax.
    "odds-single": ("odds-single", {"thresholds": "pair", "correction": "logistic", "min_rows": 400}),
}
ODDS = [name for name, (kind, _) in DETECTORS.items() if kind.startswith("odds")]
CORRECTORS = ["corrector", "svm", "svm-nystroem", *ODDS]
PIPELINES = [  # (detector, corrector, on_flag)
    ("learned-noisy", "odds-pair-logistic", "correct"), ("learned-noisy", "odds-pair-logistic", "reject"),
    ("learned-noisy", "odds-pair-logistic", "agree"), ("odds-single", "corrector", "agree"),
    ("odds-argmax", "svm", "correct"), (None, "svm", "correct"), ("msp", "svm-nystroem", "agree"),
    (None, "svm-nystroem", "correct"), (None, "corrector", "agree"),
    ("msp", None, "reject"), (None, None, "correct"),
]
CASES = ([("detector", name) for name in DETECTORS] + [("corrector", name) for name in CORRECTORS]
         + [("pipeline", p) for p in PIPELINES])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every defense fitted on 1,500 training samples and saved: {name: path}."""
    table = read_table(DATA, split="train")
    train = table.take(np.isin(table.sample_id, np.unique(table.sample_id)[:1500]))
    folder = tmp_path_factory.mktemp("defenses")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLP and logistic convergence at these tiny settings
        for name, (kind, params) in DETECTORS.items():
            out[name] = make_detector(kind, **params).fit_table(train).save(folder / f"{name}.npz")
    out["corrector"] = (LogitCorrector(hidden=64, epochs=2, lr=1e-3, progress=False).fit_table(train, "pgd")
                        .save(folder / "corrector.pt"))
    out["svm"] = SVMCorrector(max_rows=2000).fit_table(train, "fgsm").save(folder / "svm.npz")
    out["svm-nystroem"] = (SVMCorrector(method="nystroem", landmarks=300, max_rows=2000).fit_table(train, "fgsm")
                           .save(folder / "svm-nystroem.npz"))
    return out


@pytest.fixture(scope="module")
def rows():
    """About 500 test rows: 170 samples under clean, PGD and C&W."""
    table = read_table(DATA, split="test", attacks=["clean", "pgd", "cw"])
    return table.take(np.isin(table.sample_id, np.unique(table.sample_id)[:170]))


def _case_id(case) -> str:
    role, name = case
    return f"{role}-{name}" if isinstance(name, str) else f"{role}-{name[0]}+{name[1]}:{name[2]}"


def _inputs(table, scale: float = 1.0, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor(table.logits * scale, requires_grad=grad)
    noisy = torch.tensor(table.noisy_logits * scale, requires_grad=grad)
    return logits, noisy


def _mirror(case, files):
    role, name = case
    if role == "detector":
        return load_detector_mirror(files[name])
    if role == "corrector":
        return load_corrector_mirror(files[name])
    detector, corrector, on_flag = name
    spec = SimpleNamespace(detector=files.get(detector), corrector=files.get(corrector), on_flag=on_flag)
    return load_pipeline_mirror(spec)


def _core_pipeline(detector, corrector, on_flag: str, table) -> tuple[np.ndarray, np.ndarray]:
    """The spec's policy rules over the core's own detector flags and corrector labels."""
    model = table.logits.argmax(axis=1)
    flagged = np.ones(len(table), bool) if detector is None else detector.flag_table(table)
    if corrector is None:
        return (model if detector is None else np.where(flagged, ABSTAIN, model)), flagged
    corrected = corrector.predict_table(table)
    if on_flag == "reject":
        return np.where(flagged, ABSTAIN, model), flagged
    if on_flag == "agree":
        return np.where(flagged & (corrected != model), ABSTAIN, model), flagged
    return np.where(flagged, corrected, model), flagged


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_mirror_equals_core(case, files, rows):
    role, name = case
    mirror = _mirror(case, files)
    logits, noisy = _inputs(rows)
    if role == "detector":
        core = load_detector(files[name])
        expected, scores = core.score_table(rows), mirror(logits, noisy).numpy()
        assert scores.dtype == np.float64 and mirror.threshold == core.threshold_
        assert np.all(np.abs(scores - expected) <= 1e-5 * np.maximum(1.0, np.abs(expected)))
        np.testing.assert_array_equal(mirror.flags(logits, noisy).numpy(), core.flag_table(rows))
    elif role == "corrector":
        core = load_corrector(files[name])
        np.testing.assert_array_equal(mirror.labels(logits, noisy).numpy(), core.predict_table(rows))
        scores = mirror(logits, noisy)
        assert scores.shape == logits.shape and torch.isfinite(scores).all()
        if isinstance(core, LogitCorrector):
            np.testing.assert_allclose(scores.detach().numpy(), core.correct(rows.logits), rtol=0, atol=1e-5)
        if isinstance(core, SVMCorrector):
            np.testing.assert_allclose(mirror.decision(logits).numpy(), core.decision_function(rows.logits),
                                       rtol=0, atol=1e-9)
        if isinstance(core, SVMCorrector) and core.method_ == "nystroem":  # scores: the decision values
            assert (scores.argmax(dim=1).numpy() == core.predict_table(rows)).all()
    else:
        detector, corrector, on_flag = name
        core_detector = None if detector is None else load_detector(files[detector])
        core_corrector = None if corrector is None else load_corrector(files[corrector])
        labels, flagged = _core_pipeline(core_detector, core_corrector, on_flag, rows)
        decided = mirror.decide(logits, noisy).numpy()
        np.testing.assert_array_equal(decided, labels)
        np.testing.assert_array_equal(mirror.flagged(logits, noisy).numpy(), flagged)
        if on_flag == "correct" and detector is not None:  # today's core GatedDefense
            decision = GatedDefense(core_detector, core_corrector).check_table(rows)
            gated_labels, gated_flags = decision.label, decision.flagged
            np.testing.assert_array_equal(decided, gated_labels)
            np.testing.assert_array_equal(flagged, gated_flags)
        if on_flag != "correct" and detector is not None:
            assert (decided == ABSTAIN).any()  # the policy did something on these rows
        out = mirror(logits, noisy)
        assert (out.score is None) == (detector is None) and (out.corrected is None) == (corrector is None)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("scale", [1.0, 100.0], ids=["logits", "peaked-x100"])
def test_mirror_gradients_are_finite(case, scale, files, rows):
    """Gradients w.r.t. logits and noise queries exist and are finite, also on very peaked logits
    (where a float32 non-ME underflows to NaN)."""
    mirror = _mirror(case, files)
    logits, noisy = _inputs(rows, scale, grad=True)
    out = mirror(logits, noisy)
    parts = [out.score, out.corrected] if isinstance(mirror, PipelineMirror) else [out]
    parts = [p for p in parts if p is not None]
    if not parts:  # the bare model: nothing to differentiate
        return
    weights = torch.Generator().manual_seed(0)
    loss = sum((p * torch.randn(p.shape, generator=weights, dtype=p.dtype)).sum() for p in parts)
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    if scale == 1.0:
        assert logits.grad.abs().sum() > 0
    if mirror.needs_noise:
        assert noisy.grad is not None and torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0


def test_pipeline_refuses_a_policy_without_what_it_needs(files):
    detector = load_detector_mirror(files["msp"])
    with pytest.raises(ValueError, match="on_flag must be one of"):
        PipelineMirror(detector, None, "ignore")
    with pytest.raises(ValueError, match="needs a corrector"):
        PipelineMirror(detector, None, "correct")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mirrors_follow_the_input_device(files, rows):
    """The same outputs on CUDA as on the CPU; buffers move to the input's device."""

    def outputs(mirror, role, logits, noisy):
        if role == "pipeline":
            return mirror.decide(logits, noisy)
        return mirror(logits, noisy) if role == "detector" else mirror.labels(logits, noisy)

    logits, noisy = _inputs(rows)
    for case in CASES:
        mirror = _mirror(case, files)
        cpu = outputs(mirror, case[0], logits, noisy)
        cuda = outputs(mirror, case[0], logits.cuda(), noisy.cuda())
        assert cuda.is_cuda
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-9, atol=1e-9)
