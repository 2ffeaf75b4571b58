"""One contract over every estimator: scikit-learn's shape, arrays first, one file format."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.utils.validation import check_is_fitted

from logitguard import LogitguardError
from logitguard._io import read_header, save_arrays
from logitguard.corrector import LogitCorrector
from logitguard.detectors import KINDS, make_detector
from logitguard.estimator import FORMAT, FORMAT_VERSION, NotFittedError, load_estimator
from logitguard.svm import SVMCorrector

DATA = Path(__file__).resolve().parents[1] / "data"
ESTIMATORS = {
    **{kind: (lambda kind=kind: make_detector(kind)) for kind in KINDS},
    "odds-logistic": lambda: make_detector("odds", correction="logistic"),
    "corrector": lambda: LogitCorrector(hidden=32, epochs=2, lr=1e-3, progress=False),
    "svm": lambda: SVMCorrector(max_rows=500),
    "svm-nystroem": lambda: SVMCorrector(method="nystroem", landmarks=100, max_rows=500),
}


def _fit(name, estimator, table):
    """Fit on arrays, the way a user without tables would."""
    train = table.select(split="train")
    if isinstance(estimator, LogitCorrector):
        clean, attacked = train.select(attacks="clean"), train.select(attacks="fgsm")
        return estimator.fit(clean.logits, attacked.logits, clean.labels)
    if isinstance(estimator, SVMCorrector):
        attacked = train.select(attacks="fgsm")
        return estimator.fit(attacked.logits, attacked.labels)
    rows = train.select(attacks=["clean", "fgsm"])
    return estimator.fit(rows.logits, rows.attack != "clean", labels=rows.labels, noisy_logits=rows.noisy_logits,
                         groups=rows.sample_id, **_inputs(estimator, rows))


def _inputs(estimator, rows):
    """``features=`` for detectors that read a column besides the logits (kdensity, insen), else nothing."""
    column = getattr(estimator, "input_column", None)
    return {} if column is None else {"features": getattr(rows, column)}


def _outputs(estimator, table):
    """What the estimator computes on test rows: scores and flags, or labels."""
    rows = table.select(split="test")
    if hasattr(estimator, "score_samples"):
        extra = _inputs(estimator, rows)
        return (estimator.score_samples(rows.logits, rows.noisy_logits, **extra),
                estimator.predict(rows.logits, rows.noisy_logits, **extra))
    return (estimator.predict(rows.logits, rows.noisy_logits),)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_keeps_the_contract(name, digits_feature_table, tmp_path):
    digits_split_table = digits_feature_table  # the digits rows with features and insen columns
    estimator = ESTIMATORS[name]()
    test = digits_split_table.select(split="test")
    # Not fitted: one error type, both logitguard's and scikit-learn's, and check_is_fitted agrees.
    with pytest.raises(NotFittedError, match="is not fitted yet"):
        _outputs(estimator, digits_split_table)
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(estimator)
    # scikit-learn's parameter protocol: clone, get_params(deep), set_params.
    params = estimator.get_params(deep=True)
    twin = clone(estimator)
    assert twin is not estimator and twin.get_params() == params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLP and logistic convergence at these tiny settings
        assert _fit(name, estimator, digits_split_table) is estimator  # fit returns self
    check_is_fitted(estimator)
    assert estimator.get_params() == params  # fitting never rewrites a parameter
    learned = [k for k in vars(estimator) if k.endswith("_") and not k.startswith("_")]
    assert learned and not [k for k in vars(twin) if k.endswith("_") and not k.startswith("_")]
    before = _outputs(estimator, digits_split_table)
    assert all(len(out) == len(test) for out in before)
    # One file format for all: header + plain arrays, same outputs after loading.
    path = estimator.save(tmp_path / f"{name}.npz")
    header = read_header(path)
    assert (header["format"], header["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert header["params"] == {k: v for k, v in params.items() if k not in ("device", "progress")}
    loaded = load_estimator(path)
    assert type(loaded) is type(estimator)
    for a, b in zip(before, _outputs(loaded, digits_split_table)):
        np.testing.assert_array_equal(a, b)
    # Wrong inputs are refused with a message, not a traceback deep inside.
    with pytest.raises(LogitguardError, match="expected 10"):
        _outputs(loaded, test.__class__.from_arrays(
            logits=np.zeros((2, 7)), sample_id=np.arange(2), split="test", attack="clean",
            noisy_logits=np.zeros((2, 3, 7))))
    bad = test.logits.copy()
    bad[1, 2] = np.nan
    with pytest.raises(LogitguardError, match=re.escape("logits contain NaN or infinite values (first in row 1)")):
        loaded.predict(bad, test.noisy_logits, **_inputs(loaded, test))
    column = getattr(loaded, "input_column", None)
    if column is not None:  # the extra column: required, checked like the logits
        with pytest.raises(LogitguardError, match=f"reads the '{column}' column: pass its rows as features="):
            loaded.predict(test.logits, test.noisy_logits)
        with pytest.raises(LogitguardError, match="values per row; this detector was fitted on"):
            loaded.predict(test.logits, test.noisy_logits, features=getattr(test, column)[:, :-1])
        holes = getattr(test, column).copy()
        holes[3, 0] = np.inf
        with pytest.raises(LogitguardError, match=re.escape("contain NaN or infinite values (first in row 3)")):
            loaded.predict(test.logits, test.noisy_logits, features=holes)
        bare = test.__class__.from_arrays(logits=test.logits, sample_id=test.sample_id, split="test",
                                          attack=test.attack, noisy_logits=test.noisy_logits)
        with pytest.raises(LogitguardError, match=f"reads the table column '{column}', which this table lacks"):
            loaded.score_table(bare)
    elif hasattr(loaded, "score_samples"):
        with pytest.raises(LogitguardError, match="reads logits only"):
            loaded.score_samples(test.logits, test.noisy_logits, features=np.zeros((len(test), 3)))


def test_a_file_from_a_newer_logitguard_is_refused(tmp_path):
    path = save_arrays(tmp_path / "future.npz", {"format": FORMAT, "format_version": FORMAT_VERSION + 1,
                                                 "estimator": "msp", "params": {}}, {}, overwrite=False)
    with pytest.raises(LogitguardError, match=re.escape("written by a newer logitguard (format_version 2")):
        load_estimator(path)
    unknown = save_arrays(tmp_path / "unknown.npz", {"format": FORMAT, "format_version": 1, "estimator": "nope",
                                                     "params": {}}, {}, overwrite=False)
    with pytest.raises(LogitguardError, match="unknown estimator 'nope'"):
        load_estimator(unknown)


@pytest.mark.parametrize("name", ["corrector-pgd.pt", "learned-noisy.npz", "odds-logistic.npz"])
def test_files_of_the_earlier_formats_still_load(name):
    """data/defenses was written before the shared format (the adaptive partitions record these files'
    hashes, so they stay as they are): each file still loads and predicts."""
    path = DATA / "defenses" / name
    assert read_header(path) is None or read_header(path)["format"] != FORMAT
    estimator = load_estimator(path)
    rows = np.random.default_rng(0).normal(size=(4, 10)) * 5
    noisy = rows[:, None, :] + np.random.default_rng(1).normal(size=(4, 8, 10))
    assert estimator.predict(rows, noisy).shape == (4,)
    assert json.dumps(estimator.get_params())  # plain values


def test_a_guard_file_loads_in_a_fresh_interpreter(digits_split_table, tmp_path):
    """Reading a file must not depend on which estimator modules were imported before (registration)."""
    import subprocess
    import sys

    from logitguard.guard import Guard

    path = Guard.fit(digits_split_table, detector="msp", corrector="svm", on_flag="correct").save(tmp_path / "g.npz")
    code = f"from logitguard.guard import Guard; print(Guard.load({str(path)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "detector='msp'" in out.stdout and "corrector='svm'" in out.stdout
