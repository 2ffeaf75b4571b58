"""One contract over every estimator: scikit-learn's shape, arrays first, one file format.

scikit-learn's own estimator checks run here where they apply (`test_sklearn_checks_*`):

- on every estimator (detectors, `LogitCorrector`, `SVMCorrector`, `OddsCorrector`): the parameter protocol
  and the unfitted state — check_get_params_invariance, check_set_params, check_no_attributes_set_in_init,
  check_parameters_default_constructible, check_estimator_cloneable, check_estimator_repr,
  check_do_not_raise_errors_in_init_or_set_params, check_estimators_unfitted, check_mixin_order,
  check_valid_tag_types, check_estimator_tags_renamed;
- on the estimators whose `fit` takes one (N, C) array and one (N,) vector, so that sklearn's X and y can
  stand in for logits and attacked flags / labels (the logit baselines, ``learned``, ``odds-single``, the
  SVM): check_dont_overwrite_parameters, check_estimators_overwrite_params, check_fit_check_is_fitted,
  check_estimators_fit_returns_self, check_fit_idempotent.

Not run, and why: those fit checks on ``odds``, ``learned-noisy`` and `OddsCorrector` (they need noise queries
(N, K, C), which sklearn's X does not carry), ``kdensity`` and ``insen`` (they need ``features=``) and
`LogitCorrector` (it fits paired clean and attacked logits plus labels); `test_every_estimator_keeps_the_contract`
covers the same properties for them on real tables. check_n_features_in (our width is ``n_classes_``, the
logits' C; ``n_features_`` is an input column's width). check_estimators_pickle (files are plain arrays and
never pickled: `save` / `load_estimator`). The classifier, regressor, outlier and transformer checks (a
detector's output is a flag from logits, not a class of X; sklearn's outlier detectors flag with -1/1 and
the opposite score sign), the sample-weight, sparse, dtype-object, pandas and array-API checks (logits are
dense float arrays; no sample weights).
"""

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
from logitguard.files import read_header, save_arrays
from logitguard.defenses.corrector import LogitCorrector
from logitguard.defenses.detectors import KINDS, make_detector
from logitguard.defenses.estimator import FORMAT, FORMAT_VERSION, NotFittedError, load_estimator
from logitguard.defenses.svm import SVMCorrector

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


def _decide(estimator):
    """A detector's `flag` or a corrector's `predict`: the one verdict each gives per row."""
    return estimator.flag if hasattr(estimator, "score_samples") else estimator.predict


def _outputs(estimator, table):
    """What the estimator computes on test rows: scores and flags, or labels."""
    rows = table.select(split="test")
    if hasattr(estimator, "score_samples"):
        extra = _inputs(estimator, rows)
        flags = estimator.flag(rows.logits, rows.noisy_logits, **extra)
        assert flags.dtype == bool and not hasattr(estimator, "predict")  # detectors flag, correctors predict
        np.testing.assert_array_equal(estimator.flag_table(rows), flags)
        return estimator.score_samples(rows.logits, rows.noisy_logits, **extra), flags
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
    if hasattr(estimator, "calibrate"):  # nor does calibrating, or recalibrating a copy
        other = estimator.with_fpr(0.2)
        assert other.fpr == 0.2 and other.get_params() == {**params, "fpr": 0.2}
        estimator.calibrate(estimator.calibration_scores_)
        assert estimator.get_params() == params
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
        _decide(loaded)(bad, test.noisy_logits, **_inputs(loaded, test))
    column = getattr(loaded, "input_column", None)
    if column is not None:  # the extra column: required, checked like the logits
        with pytest.raises(LogitguardError, match=f"reads the '{column}' column: pass its rows as features="):
            loaded.flag(test.logits, test.noisy_logits)
        with pytest.raises(LogitguardError, match="values per row; this detector was fitted on"):
            loaded.flag(test.logits, test.noisy_logits, features=getattr(test, column)[:, :-1])
        holes = getattr(test, column).copy()
        holes[3, 0] = np.inf
        with pytest.raises(LogitguardError, match=re.escape("contain NaN or infinite values (first in row 3)")):
            loaded.flag(test.logits, test.noisy_logits, features=holes)
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


@pytest.mark.parametrize("path", [Path(__file__).parent / "data" / "legacy-defenses" / "corrector-pgd.pt",
                                  DATA / "defenses" / "learned-noisy.npz", DATA / "defenses" / "odds-logistic.npz"])
def test_files_of_the_earlier_formats_still_load(path):
    """Files written before the shared format still load and predict: the shipped corrector as it was saved
    (torch .pt) and the two shipped detectors, kept byte for byte because the adaptive partitions of
    data/fashion-mnist record their sha256."""
    assert read_header(path) is None or read_header(path)["format"] != FORMAT
    estimator = load_estimator(path)
    rows = np.random.default_rng(0).normal(size=(4, 10)) * 5
    noisy = rows[:, None, :] + np.random.default_rng(1).normal(size=(4, 8, 10))
    assert _decide(estimator)(rows, noisy).shape == (4,)
    assert json.dumps(estimator.get_params())  # plain values


def test_a_guard_file_loads_in_a_fresh_interpreter(digits_split_table, tmp_path):
    """Reading a file must not depend on which estimator modules were imported before (registration)."""
    import subprocess
    import sys

    from logitguard.evaluation.guard import fit_guard

    path = fit_guard(digits_split_table, detector="msp", corrector="svm", on_flag="correct").save(tmp_path / "g.npz")
    code = f"from logitguard.defenses.guard import Guard; print(Guard.load({str(path)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "detector='msp'" in out.stdout and "corrector='svm'" in out.stdout


def _every_estimator():
    from logitguard.defenses.detectors import OddsCorrector, OddsTest

    return {**{name: make() for name, make in ESTIMATORS.items()}, "odds-corrector": OddsCorrector(OddsTest())}


PROTOCOL_CHECKS = ("check_get_params_invariance", "check_set_params", "check_no_attributes_set_in_init",
                   "check_parameters_default_constructible", "check_estimator_cloneable", "check_estimator_repr",
                   "check_do_not_raise_errors_in_init_or_set_params", "check_estimators_unfitted",
                   "check_mixin_order", "check_valid_tag_types", "check_estimator_tags_renamed")
FIT_CHECKS = ("check_dont_overwrite_parameters", "check_estimators_overwrite_params", "check_fit_check_is_fitted",
              "check_estimators_fit_returns_self", "check_fit_idempotent")
XY_ESTIMATORS = ("msp", "maxlogit", "energy", "nonme", "odds-single", "svm")


@pytest.mark.parametrize("check", PROTOCOL_CHECKS)
def test_sklearn_checks_of_the_parameter_protocol(check):
    from sklearn.utils import estimator_checks

    for name, estimator in _every_estimator().items():
        getattr(estimator_checks, check)(name, estimator)


@pytest.mark.parametrize("check", FIT_CHECKS)
def test_sklearn_checks_of_fit_where_x_and_y_fit(check):
    from sklearn.utils import estimator_checks

    estimators = {**{name: ESTIMATORS[name]() for name in XY_ESTIMATORS},
                  "learned": make_detector("learned", hidden=8, max_iter=20)}
    for name, estimator in estimators.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(estimator_checks, check)(name, estimator)


def test_init_only_stores_and_fit_validates():
    """Bad parameters construct (scikit-learn's rule: __init__ only stores) and `fit` refuses them."""
    from logitguard.defenses.detectors import MSPDetector, SingleShotOddsTest

    logits = np.random.default_rng(0).normal(size=(20, 4))
    labels = np.arange(20) % 4
    cases = [(MSPDetector(fpr=2.0), "fpr", lambda e: e.fit(logits), "fpr must be in"),
             (SingleShotOddsTest(thresholds="bogus"), "thresholds", lambda e: e.fit(logits), "thresholds must be"),
             (SVMCorrector(C=-1.0), "C", lambda e: e.fit(logits, labels), "C must be > 0"),
             (LogitCorrector(hidden=0), "hidden", lambda e: e.fit(logits, logits, labels), "hidden")]
    for estimator, name, fit, message in cases:
        value = estimator.get_params()[name]
        with pytest.raises(LogitguardError, match=message):
            fit(estimator)
        assert estimator.get_params()[name] == value and not estimator.__sklearn_is_fitted__()


def test_the_odds_corrector_is_a_meta_estimator(digits_split_table):
    """`OddsCorrector` stores its odds test as given; clone gives an unfitted copy; fit fits the odds test."""
    from logitguard.defenses.detectors import OddsCorrector, OddsTest

    train = digits_split_table.select(split="train", attacks=["clean", "fgsm"])
    test = digits_split_table.select(split="test", attacks="fgsm")
    corrector = OddsCorrector(OddsTest())  # an unfitted odds test is accepted: __init__ only stores
    with pytest.raises(NotFittedError):
        corrector.predict(test.logits, test.noisy_logits)
    assert corrector.fit(train.logits, train.attack != "clean", noisy_logits=train.noisy_logits) is corrector
    check_is_fitted(corrector)
    labels = corrector.predict(test.logits, test.noisy_logits)
    np.testing.assert_array_equal(labels, corrector.odds.correct(test.logits, test.noisy_logits))
    twin = clone(corrector)
    assert twin.odds is not corrector.odds and twin.odds.get_params() == corrector.odds.get_params()
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(twin)
    with pytest.raises(LogitguardError, match="wraps an odds test"):
        OddsCorrector("odds").predict(test.logits)


def test_one_fitted_check_and_one_message():
    """Every way of asking "fitted?" raises the same error: the detectors' mid-fit moments check too."""
    from logitguard.defenses.detectors import OddsTest

    messages = set()
    for estimator, call in [(OddsTest(), lambda e: e.features(np.zeros((2, 3)), np.zeros((2, 1, 3)))),
                            (LogitCorrector(), lambda e: e.weights_),
                            (SVMCorrector(), lambda e: e.predict(np.zeros((2, 3)))),
                            (make_detector("msp"), lambda e: e.flag(np.zeros((2, 3))))]:
        with pytest.raises(NotFittedError) as info:
            call(estimator)
        messages.add(str(info.value).replace(type(estimator).__name__, "X"))
    assert messages == {"this X is not fitted yet; call fit() or load() first"}


def test_every_estimator_fits_a_table_through_one_signature(digits_train):
    """``fit_table(table, attacks=None)`` for detectors and correctors alike: every row given (the caller selects
    the split), attacks by position or keyword, every attack of the table by default, clean or a missing attack
    refused by name."""
    import inspect

    from logitguard.defenses.corrector import LogitCorrector
    from logitguard.defenses.detectors import Detector, make_detector
    from logitguard.defenses.svm import SVMCorrector

    for cls in (LogitCorrector, SVMCorrector, Detector):
        params = list(inspect.signature(cls.fit_table).parameters.values())
        assert [p.name for p in params[:3]] == ["self", "table", "attacks"], cls
        assert params[2].default is None and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])
        assert "split" not in [p.name for p in params], cls
    svm = SVMCorrector(seed=0).fit_table(digits_train)
    assert svm.attacks_ == [a for a in digits_train.attacks if a != "clean"]
    detector = make_detector("msp", fpr=0.05).fit_table(digits_train, "fgsm")
    assert detector.threshold_ == make_detector("msp", fpr=0.05).fit_table(digits_train, ["fgsm"]).threshold_
    for bad, message in (("clean", "not 'clean'"), ("pgd", r"no rows for attack\(s\) \['pgd'\]")):
        with pytest.raises(LogitguardError, match=message):
            SVMCorrector().fit_table(digits_train, bad)
        with pytest.raises(LogitguardError, match=message):
            LogitCorrector(hidden=8, epochs=1, progress=False).fit_table(digits_train, bad)
