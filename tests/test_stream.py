"""Streamed commands equal the in-memory ones: every apply path read in many tiny batches.

Each test runs a streamed entry point (`logitguard.tables.stream`, `Detector.fit_path`, `explain_path`,
a guard) with batches of a few rows, on a single-file table (row filters) and on the
partitioned directory (partition pruning), and compares with the in-memory function on the loaded table.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from logitguard import TableError, read_table, write_table
from logitguard.cli import main
from logitguard.defenses.corrector import LogitCorrector
from logitguard.defenses.gated import GatedDefense
from logitguard.defenses.detectors import LOGIT_KINDS, make_detector
from logitguard.evaluation.evaluate import detection_table, evaluate
from logitguard.engines.stream import correct_path, defend_path, detect_path, evaluate_path, summarize_path
from logitguard.report.summary import summarize
from logitguard.tables import CLEAN, LogitTable, TableSource, iter_batches, read_keys, write_batches

BATCH = 29  # rows per batch: the whole table is read in over a hundred batches


@pytest.fixture(scope="module", params=["file", "directory"])
def source(request, digits_split_table, digits_split_dir, tmp_path_factory):
    """The digits table as one Parquet file (rows filtered by the reader) or as a partitioned directory."""
    if request.param == "directory":
        return digits_split_dir
    path = tmp_path_factory.mktemp("one") / "digits.parquet"
    write_table(digits_split_table, path)
    return path


@pytest.fixture(scope="module")
def corrector(digits_train):
    return LogitCorrector(hidden=32, epochs=3, lr=1e-3, progress=False).fit_table(digits_train, "fgsm")


def _same_tables(a: LogitTable, b: LogitTable, *, rounding: bool = False) -> None:
    """Equal tables; with `rounding`, logits equal up to float32 rounding (a corrector's matrix products round
    differently for another number of rows at once)."""
    assert a.columns == b.columns and a.metadata == b.metadata
    for name in a.columns:
        if name in ("split", "attack"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        elif name == "logits" and rounding:
            np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
        else:
            assert a.arrow.column(name).equals(b.arrow.column(name)), name


# -- inspect and correct -----------------------------------------------------------------------


def test_inspect_streamed_equals_in_memory(source):
    assert summarize_path(source, batch_rows=BATCH) == summarize(read_table(source))


def test_inspect_cli_streams(source, monkeypatch):
    monkeypatch.setenv("LOGITGUARD_BATCH_ROWS", str(BATCH))
    result = CliRunner().invoke(main, ["inspect", str(source), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads(json.dumps(summarize(read_table(source))))


@pytest.mark.parametrize("out", ["corrected.parquet", "corrected"])
def test_correct_streamed_equals_in_memory(source, corrector, tmp_path, out):
    partition = None if out.endswith(".parquet") else ("split", "attack")
    written, summary = correct_path(corrector, source, tmp_path / out, partition_by=partition, batch_rows=BATCH)
    expected = corrector.correct_table(read_table(source, columns=["linf", "l2"]))
    reference = write_table(expected, tmp_path / f"ref-{out}", partition_by=partition, basename="corrected")
    assert [p.relative_to(tmp_path / out) for p in written] == \
        [p.relative_to(tmp_path / f"ref-{out}") for p in reference]
    _same_tables(read_table(tmp_path / out), read_table(tmp_path / f"ref-{out}"), rounding=True)
    assert summary == summarize(expected)


# -- evaluate, detect, fit-detector ------------------------------------------------------------


@pytest.mark.parametrize("attacks", [None, ["bim"]])
def test_evaluate_streamed_equals_in_memory(source, corrector, attacks):
    defenses = {"corrector": corrector,
                "gated": GatedDefense(make_detector("odds").fit_table(read_table(source, split="train")), corrector)}
    streamed = evaluate_path(TableSource(source, split="test"), defenses, attacks=attacks, batch_rows=BATCH)
    pd.testing.assert_frame_equal(streamed, evaluate(read_table(source, split="test"), defenses, attacks=attacks))


@pytest.mark.parametrize("kind", LOGIT_KINDS)  # the feature kinds: tests/test_feature_detectors.py
def test_fit_detector_streamed_equals_in_memory(source, kind):
    fitted = make_detector(kind).fit_table(read_table(source, split="train"))
    streamed = make_detector(kind).fit_path(TableSource(source, split="train"), batch_rows=BATCH)
    # The odds test's class moments are sums taken in another order: equal up to float rounding.
    np.testing.assert_allclose(streamed.calibration_scores_, fitted.calibration_scores_, rtol=1e-9)
    assert streamed.threshold_ == pytest.approx(fitted.threshold_, rel=1e-9)
    assert streamed.achieved_fpr_ == fitted.achieved_fpr_
    assert (streamed.n_classes_, streamed.n_queries_) == (fitted.n_classes_, fitted.n_queries_)
    for name, value in fitted._learned().items():
        np.testing.assert_allclose(streamed._learned()[name], value, rtol=1e-9, err_msg=name)


@pytest.mark.parametrize("params", [{"correction": "logistic"}, {"thresholds": "pair"}])
def test_odds_rules_streamed_equal_in_memory(digits_split_dir, params):
    source = digits_split_dir
    fitted = make_detector("odds", **params).fit_table(read_table(source, split="train"), attacks=["fgsm"])
    streamed = make_detector("odds", **params).fit_path(TableSource(source, split="train"), attacks=["fgsm"],
                                                        batch_rows=BATCH)
    for name, value in fitted._learned().items():
        np.testing.assert_allclose(streamed._learned()[name], value, rtol=1e-9, atol=1e-12, err_msg=name)
    assert streamed.threshold_ == pytest.approx(fitted.threshold_, rel=1e-9)


def test_learned_detector_learns_from_a_seeded_sample_beyond_max_rows(digits_split_dir):
    test = read_table(digits_split_dir, split="test")
    train = TableSource(digits_split_dir, split="train")
    first = make_detector("learned", seed=3).fit_path(train, max_rows=300)
    again = make_detector("learned", seed=3).fit_path(train, max_rows=300)
    whole = make_detector("learned", seed=3).fit_path(train)
    assert first.stream_fit_rows_ == (300, whole.stream_fit_rows_[1]) and whole.stream_fit_rows_[0] > 300
    np.testing.assert_array_equal(first.w1_, again.w1_)  # the sample is seeded
    # The threshold is still calibrated on every held-out clean row, so the FPR target holds.
    assert len(first.calibration_scores_) == len(whole.calibration_scores_)
    clean = test.select(attacks=CLEAN)
    assert first.flag_table(clean).mean() < 0.15
    # Fewer rows, a weaker network (0.82 AUROC from all 692 rows, 0.71 from 300), but it still detects.
    assert detection_table(test, {"sampled": first})["auroc"].min() > 0.65


@pytest.mark.parametrize("kind", ["msp", "learned-noisy", "odds"])
def test_detect_streamed_equals_in_memory(source, kind):
    detector = make_detector(kind).fit_table(read_table(source, split="train"))
    report = detect_path(detector, TableSource(source, split="test"), batch_rows=BATCH)
    data = read_table(source, split="test")
    flagged = detector.flag_table(data)
    assert report["flagged_rate"] == {a: float(flagged[data.attack == a].mean()) for a in data.attacks}
    pd.testing.assert_frame_equal(report["metrics"], detection_table(data, {detector.kind: detector}))


def test_detect_without_labels_reports_rates_only(digits_train, digits_split_table, tmp_path):
    unlabelled = LogitTable.from_arrays(logits=digits_split_table.logits, sample_id=digits_split_table.sample_id,
                                        split=digits_split_table.split, attack=digits_split_table.attack)
    write_table(unlabelled, tmp_path / "u.parquet")
    detector = make_detector("msp").fit_table(digits_train)
    report = detect_path(detector, tmp_path / "u.parquet", batch_rows=BATCH)
    assert report["metrics"] is None and set(report["flagged_rate"]) == {"clean", "fgsm", "bim"}


# -- defend and guard apply --------------------------------------------------------------------


@pytest.mark.parametrize("on_flag", ["correct", "reject", "agree"])
def test_defend_streamed_equals_in_memory(source, corrector, tmp_path, on_flag):
    from logitguard.defenses.decision import ABSTAIN

    detector = make_detector("learned-noisy").fit_table(read_table(source, split="train"))
    defense = GatedDefense(detector, None if on_flag == "reject" else corrector, on_flag=on_flag)
    report = defend_path(defense, source, tmp_path / "out", batch_rows=BATCH)
    data = read_table(source)
    defended = defense.defend_table(data)
    write_table(defended, tmp_path / "ref", partition_by=("split", "attack"), basename="defended")
    assert report["written"] == [tmp_path / "out" / p.relative_to(tmp_path / "ref")
                                 for p in sorted((tmp_path / "ref").rglob("*.parquet"))]
    _same_tables(read_table(tmp_path / "out"), read_table(tmp_path / "ref"))
    pred, flags = defended.column("pred"), defended.column("flagged")
    assert report["flagged_rate"] == {a: float(flags[data.attack == a].mean()) for a in data.attacks}
    assert report["rejected_rate"] == {a: float((pred[data.attack == a] == ABSTAIN).mean()) for a in data.attacks}
    pd.testing.assert_frame_equal(report["evaluation"], evaluate(data.select(split="test"), {"gated": defense}))


def test_defend_one_split_into_a_file(source, corrector, tmp_path):
    defense = GatedDefense(make_detector("msp").fit_table(read_table(source, split="train")), corrector)
    report = defend_path(defense, TableSource(source, split="train"), tmp_path / "d.parquet", partition_by=None,
                         batch_rows=BATCH)
    assert report["written"] == [tmp_path / "d.parquet"]
    expected = defense.defend_table(read_table(source, split="train"))
    _same_tables(read_table(tmp_path / "d.parquet"), expected)
    pd.testing.assert_frame_equal(report["evaluation"],
                                  evaluate(read_table(source, split="train"), {"gated": defense}))


def test_guard_apply_streamed_equals_in_memory(digits_split_dir, tmp_path, monkeypatch):
    from logitguard.evaluation.guard import fit_guard

    guard = fit_guard(digits_split_dir, detector="odds", budgets=(0.2,))
    guard.save(tmp_path / "g.npz")
    report = defend_path(guard, digits_split_dir, tmp_path / "out", batch_rows=BATCH)
    _same_tables(read_table(tmp_path / "out"), guard.defend_table(read_table(digits_split_dir)))
    assert report["flagged_rate"]["clean"] < report["flagged_rate"]["bim"]
    monkeypatch.setenv("LOGITGUARD_BATCH_ROWS", str(BATCH))
    result = CliRunner().invoke(main, ["guard", "apply", str(digits_split_dir), "--guard", str(tmp_path / "g.npz"),
                                       "--out", str(tmp_path / "cli"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["flagged_rate"] == report["flagged_rate"]
    _same_tables(read_table(tmp_path / "cli"), read_table(tmp_path / "out"))


def test_guard_apply_refuses_a_table_of_other_classes_before_writing(digits_split_dir, tmp_path):
    from logitguard.evaluation.guard import fit_guard

    guard = fit_guard(digits_split_dir, detector="msp", budgets=(0.2,))
    other = LogitTable.from_arrays(logits=np.zeros((3, 4)), sample_id=[0, 1, 2], split="test", attack="clean")
    write_table(other, tmp_path / "four.parquet")
    with pytest.raises(Exception, match="the table has 4 classes; this guard expects 10"):
        defend_path(guard, tmp_path / "four.parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# -- explain -----------------------------------------------------------------------------------


def test_explain_streamed_equals_in_memory(source, corrector):
    from logitguard import explain as ex

    freqs, ablations = ex.explain_path(corrector, TableSource(source, split="test"), k=3, batch_rows=BATCH)
    data = read_table(source, split="test", columns=[])
    pd.testing.assert_frame_equal(freqs, ex.supporting_frequencies(corrector, data, None, k=3))
    assert ablations == [ex.ablation(corrector, data, a, k=3) for a in freqs.columns]


# -- the writer and the collector --------------------------------------------------------------


def test_written_files_do_not_depend_on_the_batch_size(digits_split_dir, tmp_path):
    def copy(rows: int, out: str) -> list[bytes]:
        files = write_batches(iter_batches(digits_split_dir, columns=["noisy_logits", "linf", "l2"], batch_rows=rows),
                              tmp_path / out, partition_by=("split", "attack"))
        return [f.read_bytes() for f in files]

    assert copy(BATCH, "a") == copy(997, "b")
    assert pq.ParquetFile(next((tmp_path / "a").rglob("*.parquet"))).metadata.num_row_groups == 1


def test_a_failed_stream_leaves_the_old_output(digits_split_dir, tmp_path):
    out = tmp_path / "out"
    write_table(read_table(digits_split_dir, split="test"), out, partition_by=("split", "attack"))
    before = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))

    def failing():
        for i, batch in enumerate(iter_batches(digits_split_dir, batch_rows=BATCH)):
            if i == 20:
                raise RuntimeError("killed")
            yield batch

    with pytest.raises(RuntimeError, match="killed"):
        write_batches(failing(), out, partition_by=("split", "attack"), overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*.parquet")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind
    with pytest.raises(TableError, match="nothing to write"):
        write_batches(iter([]), tmp_path / "empty.parquet")
    assert not (tmp_path / "empty.parquet").exists()


def test_a_key_repeated_in_two_batches_is_an_error(digits_table, tmp_path):
    arrow = digits_table.arrow
    doubled = pa.concat_tables([arrow.slice(0, 20), arrow.slice(5, 1)])  # row 5 again, in a later batch
    pq.write_table(doubled.replace_schema_metadata(arrow.schema.metadata), tmp_path / "dup.parquet")
    with pytest.raises(TableError, match=r"duplicate row for \(split='test', attack='clean', sample_id=5\) "
                                         r"at rows 5 and 20"):
        summarize_path(tmp_path / "dup.parquet", batch_rows=BATCH)


def test_read_keys_meets_rows_in_stream_order(digits_split_dir):
    keys = read_keys(digits_split_dir, split="train", attacks=["clean", "bim"])
    streamed = list(iter_batches(digits_split_dir, split="train", attacks=["clean", "bim"], batch_rows=BATCH))
    np.testing.assert_array_equal(keys.sample_id, np.concatenate([b.sample_id for b in streamed]))
    np.testing.assert_array_equal(keys.attack, np.concatenate([b.attack for b in streamed]))
    assert keys.num_classes == 10 and keys.has_labels


@pytest.mark.parametrize("path", ["digits_split_dir", "one_file"])
def test_a_table_source_selects_the_same_rows_in_every_reader(path, digits_split_dir, digits_split_table, tmp_path,
                                                              request):
    """A `TableSource` is the selection made once: read whole, streamed, as keys or counted, the same rows."""
    from logitguard.tables import row_counts
    from logitguard.tables.stream import TableStream, stream_batches

    if path == "one_file":  # the split a column inside the file, not a partition of the path
        write_table(digits_split_table, tmp_path / "t.parquet")
        path = tmp_path / "t.parquet"
    else:
        path = request.getfixturevalue(path)
    source = TableSource(path, split="test", attacks=("clean", "fgsm"))
    whole = read_table(source, columns=[])
    assert whole.splits == ["test"] and whole.attacks == ["clean", "fgsm"]
    for batches in (list(stream_batches(source, batch_rows=BATCH)), list(iter_batches(source, batch_rows=BATCH)),
                    [b for _, b in TableStream(source, batch_rows=BATCH).batches()]):
        _same_tables(LogitTable(pa.concat_tables([b.arrow for b in batches]), whole.metadata), whole)
    keys = read_keys(source)
    np.testing.assert_array_equal(keys.sample_id, whole.sample_id)
    assert row_counts(source) == {"clean": 397, "fgsm": 397}
    # Narrowing keeps the selection: attacks within it, never another split.
    assert read_table(source, attacks="fgsm").attacks == ["fgsm"]
    assert read_table(TableSource(path), split="test").splits == ["test"]
    with pytest.raises(TableError, match="the source is split 'test'; it cannot be narrowed to 'train'"):
        read_table(source, split="train")
