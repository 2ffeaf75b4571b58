"""The SVM corrector's approximate method (nystroem) beside the exact one, and the choice between them."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import RidgeClassifier

from logitguard import LogitguardError
from logitguard.files import save_arrays
from logitguard.defenses.estimator import load_estimator
from logitguard.defenses.svm import EXACT_MAX_CLASSES, SVMCorrector, _balanced_rows


def _synthetic(classes: int, rows: int, *, dim: int = 64, eps: float = 0.3, seed: int = 0):
    """A small version of bench/svm.py's table: Gaussian class clusters, an imperfect linear model and
    FGSM on its cross-entropy (exact input gradient). Returns clean logits, FGSM logits, labels."""
    model = np.random.default_rng(classes)
    means = model.normal(size=(classes, dim)) * 0.5
    weights = means + model.normal(size=(classes, dim)) * 0.2
    bias = -0.5 * (weights * weights).sum(axis=1)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    x = means[y] + rng.normal(size=(rows, dim))
    z = x @ weights.T + bias
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(rows), y] -= 1.0
    return z, (x + eps * np.sign(p @ weights)) @ weights.T + bias, y


@pytest.fixture(scope="module")
def digits_fgsm(digits_split_table):
    train = digits_split_table.select(split="train", attacks="fgsm")
    test = digits_split_table.select(split="test", attacks="fgsm")
    return train, test


def test_nystroem_is_ridge_on_nystroem_features(digits_fgsm):
    """The closed form equals scikit-learn's Nystroem features (on the same landmarks) + RidgeClassifier
    with alpha 1/C: the least-squares SVM, one-vs-rest, with unpenalised intercepts."""
    train, test = digits_fgsm
    svm = SVMCorrector(method="nystroem", landmarks=200, C=2.0).fit(train.logits, train.labels)
    assert svm.method_ == "nystroem" and svm.support_vectors_.shape == (200, 10) and svm.coef_.shape == (200, 10)
    scale = lambda x: (x - svm.center_) / svm.scale_  # noqa: E731
    features = Nystroem(gamma=svm.gamma_, n_components=200).fit(svm.support_vectors_)
    reference = RidgeClassifier(alpha=0.5).fit(features.transform(scale(train.logits)), train.labels)
    x = features.transform(scale(test.logits))
    np.testing.assert_allclose(svm.decision_function(test.logits), reference.decision_function(x), atol=1e-6)
    np.testing.assert_array_equal(svm.predict(test.logits), reference.predict(x))


def test_nystroem_agrees_with_exact_where_both_are_sure(digits_fgsm):
    """Well-separated classes: both methods give every test row the same (true) label. On the digits
    FGSM logits they agree on most rows and recover about as much."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 10
    y = rng.integers(0, 4, 600)
    x = centres[y] + rng.normal(size=(600, 6))
    exact = SVMCorrector(method="exact").fit(x[:400], y[:400])
    approx = SVMCorrector(method="nystroem", landmarks=100).fit(x[:400], y[:400])
    np.testing.assert_array_equal(approx.predict(x[400:]), exact.predict(x[400:]))
    np.testing.assert_array_equal(approx.predict(x[400:]), y[400:])
    train, test = digits_fgsm
    exact = SVMCorrector(method="exact").fit(train.logits, train.labels)
    approx = SVMCorrector(method="nystroem").fit(train.logits, train.labels)
    assert (exact.predict(test.logits) == approx.predict(test.logits)).mean() > 0.85
    assert approx.score(test.logits, test.labels) > exact.score(test.logits, test.labels) - 0.03


def test_auto_keeps_exact_for_tens_of_classes_and_refuses_exact_at_scale():
    z, attacked, y = _synthetic(EXACT_MAX_CLASSES + 1, 300)
    assert SVMCorrector(landmarks=50).fit(attacked, y).method_ == "nystroem"
    assert SVMCorrector().fit(attacked[:, :10], y % 10).method_ == "exact"
    labels = np.arange(2000) % 1000
    with pytest.raises(LogitguardError, match=r"method='exact' at 1000 classes and 2000 rows could need 7 GiB"):
        SVMCorrector(method="exact").fit(np.random.default_rng(0).normal(size=(2000, 1000)), labels)
    for bad, match in [({"method": "ovo"}, "method must be one of"), ({"landmarks": 0}, "landmarks must be"),
                       ({"max_rows": 0}, "max_rows must be None or")]:
        with pytest.raises(LogitguardError, match=match):
            SVMCorrector(**bad).fit(attacked, y)


def test_balanced_landmarks_take_every_class_before_a_second_row():
    y = np.repeat(np.arange(5), [1, 2, 50, 100, 3])
    picked = _balanced_rows(y, 7, seed=0)
    assert len(set(picked)) == 7 and set(np.bincount(y[picked], minlength=5)) == {1, 2}
    assert len(_balanced_rows(y, 1000, seed=0)) == len(y)
    np.testing.assert_array_equal(picked, _balanced_rows(y, 7, seed=0))


def test_two_hundred_classes_fit_quickly_beat_argmax_and_round_trip(tmp_path):
    _, attacked, y = _synthetic(200, 10_000)
    _, test, test_y = _synthetic(200, 2000, seed=1)
    start = time.perf_counter()
    svm = SVMCorrector(landmarks=500).fit(attacked, y)
    assert time.perf_counter() - start < 10  # about 1 s on two cores
    assert svm.method_ == "nystroem" and svm.coef_.shape == (500, 200)
    argmax = (test.argmax(axis=1) == test_y).mean()
    assert argmax < 0.1 and svm.score(test, test_y) > argmax + 0.08
    path = svm.save(tmp_path / "svm.npz")
    loaded = load_estimator(path)
    assert loaded.method_ == "nystroem" and "pairs_" not in vars(loaded)
    np.testing.assert_array_equal(loaded.decision_function(test), svm.decision_function(test))


def test_an_exact_file_from_before_method_still_loads(digits_fgsm, tmp_path):
    """SVM files written before `method` existed have no method in their state nor params: exact."""
    train, test = digits_fgsm
    svm = SVMCorrector(max_rows=500).fit(train.logits, train.labels)
    header, arrays = svm.to_arrays()
    assert header["state"]["method"] == "exact"
    del header["state"]["method"]
    header["params"] = {k: header["params"][k] for k in ("C", "gamma", "max_rows", "seed")}
    header["params"]["max_rows"] = 20000
    loaded = load_estimator(save_arrays(tmp_path / "old.npz", header, arrays, overwrite=False))
    assert loaded.method_ == "exact"
    np.testing.assert_array_equal(loaded.predict(test.logits), svm.predict(test.logits))
