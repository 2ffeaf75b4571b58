"""Property-based round trips (hypothesis): the table reader and writer on random shapes, nulls, class
counts and partitionings, and every save/load of a fitted object: each estimator kind, the guard and
pipeline manifests. A saved object read back computes the same outputs and saves to the same bytes."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from logitguard import read_table, write_table
from logitguard.defenses.corrector import LogitCorrector
from logitguard.defenses.gated import GatedDefense, as_corrector
from logitguard.defenses.detectors import LOGIT_KINDS, make_detector
from logitguard.defenses.estimator import load_estimator
from logitguard.defenses.guard import Guard
from logitguard.defenses.pipelines import load_pipelines, save_pipelines
from logitguard.defenses.svm import SVMCorrector
from logitguard.tables import conform

SPLITS = ["train", "test", "deploy", "2024"]  # "2024": a partition value that looks like a number
ATTACKS = ["clean", "pgd", "fgsm-e8", "adaptive.ln-odds.routes.e16", "0", "ü"]
FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def logit_tables(draw):
    """A random valid table: 1-30 rows, C in 2..6, optional K noise queries and F features, nulls where
    the contract allows them, any split/attack names (including ones that look like numbers)."""
    c = draw(st.integers(2, 6))
    keys = draw(st.lists(st.tuples(st.sampled_from(SPLITS), st.sampled_from(ATTACKS), st.integers(0, 2**40)),
                         min_size=1, max_size=30, unique=True))
    n = len(keys)
    split, attack, sample_id = (list(col) for col in zip(*keys))
    columns = {"sample_id": pa.array(sample_id, pa.int64()), "split": pa.array(split), "attack": pa.array(attack),
               "label": pa.array(draw(st.lists(st.none() | st.integers(0, c - 1), min_size=n, max_size=n)),
                                 pa.int64()),
               "logits": _tensor(draw(hnp.arrays(np.float32, (n, c), elements=FLOAT32)))}
    k = draw(st.integers(0, 3))
    if k:
        columns["noisy_logits"] = _tensor(draw(hnp.arrays(np.float32, (n, k, c), elements=FLOAT32)))
    if draw(st.booleans()):
        columns["pred"] = pa.array(draw(st.lists(st.none() | st.integers(0, c - 1), min_size=n, max_size=n)),
                                   pa.int64())
    if draw(st.booleans()):
        columns["success"] = pa.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    for name in ("linf", "l2"):
        if draw(st.booleans()):
            columns[name] = pa.array(draw(st.lists(st.none() | FLOAT32, min_size=n, max_size=n)), pa.float32())
    if draw(st.booleans()):
        columns["features"] = _tensor(draw(hnp.arrays(np.float32, (n, draw(st.integers(1, 4))), elements=FLOAT32)))
    metadata = {"class_names": draw(st.lists(st.text(min_size=1, max_size=6), min_size=c, max_size=c, unique=True)),
                "dataset": draw(JSON)}
    return conform(pa.table(columns), metadata=metadata)


def _tensor(values: np.ndarray) -> pa.Array:
    arr: pa.Array = pa.array(values.ravel())
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def _sorted(arrow: pa.Table) -> pa.Table:
    return arrow.sort_by([("split", "ascending"), ("attack", "ascending"), ("sample_id", "ascending")])


@settings(max_examples=40, **FAST)
@given(table=logit_tables(), partitioned=st.booleans())
def test_tables_round_trip(table, partitioned):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("t" if partitioned else "t.parquet")
        by = ("split", "attack") if partitioned else None
        files = write_table(table, path, partition_by=by)
        back = read_table(path)
        assert back.metadata == table.metadata
        assert _sorted(back.arrow).equals(_sorted(table.arrow))
        np.testing.assert_array_equal(np.sort(back.labels), np.sort(table.labels))  # nulls read as -1
        # Writing what was read gives the same bytes: the writer is deterministic.
        again = write_table(back, Path(tmp) / ("u" if partitioned else "u.parquet"), partition_by=by)
        if not partitioned:
            assert again[0].read_bytes() == files[0].read_bytes()
        # Filters select exactly the rows the in-memory selection does.
        split = table.splits[0]
        assert _sorted(read_table(path, split=split).arrow).equals(_sorted(table.select(split=split).arrow))


# -- estimators ------------------------------------------------------------------------------------


ESTIMATORS = {
    **{kind: (lambda kind=kind: make_detector(kind)) for kind in LOGIT_KINDS},  # logits-only data
    "odds-logistic": lambda: make_detector("odds", correction="logistic"),
    "learned-seeded": lambda: make_detector("learned", hidden=8, max_iter=50, seed=7),
    "corrector": lambda: LogitCorrector(hidden=8, epochs=2, batch_size=32, progress=False),
    "svm": lambda: SVMCorrector(max_rows=200),
}


@st.composite
def logit_data(draw):
    """Clean and attacked logits of C classes with K noise queries: a class signal plus noise; attacked
    rows have a rival class pushed up."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c, k, per_class = draw(st.integers(3, 5)), draw(st.integers(1, 3)), draw(st.integers(12, 24))
    labels = np.repeat(np.arange(c), per_class)
    clean = 4 * np.eye(c)[labels] + rng.normal(0, draw(st.floats(0.3, 1.5)), (len(labels), c))
    rival = (labels + rng.integers(1, c, len(labels))) % c
    attacked = clean - 3 * np.eye(c)[labels] + 5 * np.eye(c)[rival]
    noisy = lambda z: z[:, None, :] + rng.normal(0, 0.5, (len(z), k, c))  # noqa: E731
    return {"clean": clean, "attacked": attacked, "labels": labels, "noisy_clean": noisy(clean),
            "noisy_attacked": noisy(attacked)}


def _fit(estimator, d):
    if isinstance(estimator, LogitCorrector):
        return estimator.fit(d["clean"], d["attacked"], d["labels"])
    if isinstance(estimator, SVMCorrector):
        return estimator.fit(d["attacked"], d["labels"])
    n = len(d["labels"])
    return estimator.fit(np.r_[d["clean"], d["attacked"]], np.r_[np.zeros(n, bool), np.ones(n, bool)],
                         labels=np.r_[d["labels"], d["labels"]], noisy_logits=np.r_[d["noisy_clean"], d["noisy_attacked"]],
                         groups=np.r_[np.arange(n), np.arange(n)])


def _outputs(estimator, d):
    logits, noisy = np.r_[d["clean"], d["attacked"]], np.r_[d["noisy_clean"], d["noisy_attacked"]]
    if hasattr(estimator, "score_samples"):
        return estimator.score_samples(logits, noisy), estimator.flag(logits, noisy)
    return (estimator.predict(logits, noisy),)


@pytest.mark.parametrize("name", list(ESTIMATORS))
@settings(max_examples=4, **FAST)
@given(data=logit_data())
def test_estimators_round_trip(name, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at these tiny sizes
        estimator = _fit(ESTIMATORS[name](), data)
    with tempfile.TemporaryDirectory() as tmp:
        first = estimator.save(Path(tmp) / "a.npz")
        loaded = load_estimator(first)
        runtime = ("device", "progress")  # how to run, not what was learned: never saved
        params = {k: v for k, v in estimator.get_params().items() if k not in runtime}
        assert type(loaded) is type(estimator)
        assert {k: v for k, v in loaded.get_params().items() if k not in runtime} == params
        for a, b in zip(_outputs(estimator, data), _outputs(loaded, data)):
            np.testing.assert_array_equal(a, b)
        assert loaded.save(Path(tmp) / "b.npz").read_bytes() == first.read_bytes()


# -- the guard -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guard_parts(digits_split_table):
    train = digits_split_table.select(split="train", attacks=["clean", "fgsm"])
    attacked = train.attack != "clean"
    odds = make_detector("odds", correction="logistic").fit(train.logits, attacked, labels=train.labels,
                                                            noisy_logits=train.noisy_logits)
    msp = make_detector("msp").fit(train.logits, attacked)
    svm = SVMCorrector(max_rows=300).fit(train.logits[attacked], train.labels[attacked])
    return {"odds": odds, "msp": msp, "svm": svm}, digits_split_table.select(split="test")


POLICIES = [("msp", None, "reject"), ("msp", "svm", "correct"), ("odds", "odds", "agree"), ("odds", "svm", "reject"),
            (None, "svm", "correct"), (None, None, "correct")]


@settings(max_examples=25, **FAST)
@given(policy=st.sampled_from(POLICIES), names=st.lists(st.text(min_size=1, max_size=8), min_size=10, max_size=10,
                                                           unique=True),
       noise=JSON, provenance=st.dictionaries(st.text(max_size=8), JSON, max_size=4),
       threat=st.lists(st.dictionaries(st.text(max_size=6), JSON, max_size=3), max_size=3),
       unmeasured=st.dictionaries(st.text(max_size=6), st.text(max_size=10), max_size=3))
def test_guards_round_trip(guard_parts, policy, names, noise, provenance, threat, unmeasured):
    parts, test = guard_parts
    detector, corrector, on_flag = policy
    corrector_part = None if corrector is None else as_corrector(parts[corrector])
    defense = GatedDefense(None if detector is None else parts[detector], corrector_part, on_flag=on_flag)
    guard = Guard(defense, class_names=names, num_queries=3, noise=noise, threat=threat, unmeasured=unmeasured,
                  provenance=provenance)
    with tempfile.TemporaryDirectory() as tmp:
        first = guard.save(Path(tmp) / "g.npz")
        loaded = Guard.load(first)
        assert json.dumps(loaded.info(), sort_keys=True) == json.dumps(guard.info(), sort_keys=True)
        for a, b in zip(guard.check(test.logits, test.noisy_logits), loaded.check(test.logits, test.noisy_logits)):
            np.testing.assert_array_equal(a, b)
        assert loaded.save(Path(tmp) / "h.npz").read_bytes() == first.read_bytes()


# -- pipeline manifests ----------------------------------------------------------------------------


FILES = ["detector.npz", "sub dir/corrector ü.npz", "odds.npz"]
MANIFEST_POLICIES = [("detector", None, "reject"), ("detector", "corrector", "correct"),
                     ("corrector", "corrector", "agree"), (None, "corrector", "correct"), (None, None, "correct")]


@settings(max_examples=30, **FAST)
@given(pipelines=st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.tuples(st.sampled_from(MANIFEST_POLICIES), st.sampled_from(FILES), st.sampled_from(FILES)),
    min_size=1, max_size=5))
def test_pipeline_manifests_round_trip(pipelines):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in FILES:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(name.encode())
        entries = {}
        for name, ((detector, corrector, on_flag), det_file, cor_file) in pipelines.items():
            entry = {"on_flag": on_flag}
            if detector:
                entry["detector"] = root / det_file
            if corrector:
                entry["corrector"] = root / cor_file
            entries[name] = entry
        manifest = save_pipelines(root / "defenses.json", entries)
        specs = load_pipelines(manifest)
        assert list(specs) == list(entries)
        for name, entry in entries.items():
            spec = specs[name]
            assert spec.detector == entry.get("detector") and spec.corrector == entry.get("corrector")
            assert spec.on_flag == entry["on_flag"]
        # Saving what was loaded writes the same manifest.
        again = save_pipelines(root / "again.json", specs)
        assert again.read_bytes() == manifest.read_bytes()
