"""The logit-table contract: round trips, zero-copy views, pairing, pandas, and every validation error."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitguard import LogitTable, TableError, pair, read_table, to_pandas, write_table
from logitguard.tables import METADATA_KEY


def _same(a: LogitTable, b: LogitTable) -> None:
    for name in ("logits", "noisy_logits", "labels", "sample_id", "split", "attack"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("linf", "l2"):
        np.testing.assert_array_equal(a.column(name), b.column(name), err_msg=name)
    assert a.metadata == b.metadata


# -- round trips -------------------------------------------------------------------------------


def test_file_round_trip_keeps_every_column_and_metadata(digits_table, tmp_path):
    written = write_table(digits_table, tmp_path / "t.parquet")
    assert written == [tmp_path / "t.parquet"]
    back = read_table(tmp_path / "t.parquet")
    _same(back, digits_table)
    assert back.num_classes == 10 and back.class_names[3] == "digit-3"
    assert back.noisy_logits.shape == (len(back), 3, 10)
    assert back.metadata["attacks"] == {"fgsm": {"eps": 0.15}}


def test_partitioned_round_trip_and_filters(digits_table, tmp_path):
    files = write_table(digits_table, tmp_path / "ds", partition_by=("split", "attack"), basename="shard-0-of-1")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files) == [
        "ds/split=test/attack=clean/shard-0-of-1.parquet",
        "ds/split=test/attack=fgsm/shard-0-of-1.parquet",
    ]
    # Partition columns live in the directory names, not in the files.
    assert "attack" not in pq.read_schema(files[0]).names
    back = read_table(tmp_path / "ds")
    order = np.lexsort((back.sample_id, back.attack))
    ref = np.lexsort((digits_table.sample_id, digits_table.attack))
    np.testing.assert_array_equal(back.logits[order], digits_table.logits[ref])
    fgsm = read_table(tmp_path / "ds", split="test", attacks=["fgsm"], columns=[])
    assert fgsm.attacks == ["fgsm"] and len(fgsm) == len(digits_table) // 2
    assert fgsm.noisy_logits is None and fgsm.column("linf") is None


def test_floats_are_byte_stream_split_and_zstd(digits_table, tmp_path):
    write_table(digits_table, tmp_path / "t.parquet")
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    chunks = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    for path in ("logits.list.element", "noisy_logits.list.element.list.element", "linf", "l2"):
        assert "BYTE_STREAM_SPLIT" in chunks[path].encodings, path
    assert {c.compression for c in chunks.values()} == {"ZSTD"}


def test_logits_are_zero_copy_views_of_arrow_buffers(digits_table, tmp_path):
    write_table(digits_table, tmp_path / "t.parquet")
    table = read_table(tmp_path / "t.parquet")
    values = table.arrow.column("logits").chunk(0).values
    assert table.logits.dtype == np.float32 and table.logits.shape == (len(table), 10)
    assert table.logits.ctypes.data == values.buffers()[1].address + values.offset * 4
    assert not table.logits.flags.writeable  # a view of Arrow memory: copy before modifying
    noisy = table.arrow.column("noisy_logits").chunk(0).values.values
    assert table.noisy_logits.ctypes.data == noisy.buffers()[1].address + noisy.offset * 4


def test_hand_made_table_with_variable_lists_and_float64_is_accepted(tmp_path):
    frame = pd.DataFrame({
        "sample_id": np.array([0, 1], dtype=np.int32),
        "split": ["test", "test"],
        "attack": ["clean", "clean"],
        "label": [1, 0],
        "logits": [np.array([0.5, 2.0]), np.array([1.0, -1.0])],
    })
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "h.parquet")
    table = read_table(tmp_path / "h.parquet")
    assert table.arrow.schema.field("logits").type == pa.list_(pa.float32(), 2)
    assert table.class_names == ["0", "1"] and table.metadata["schema_version"] == 1
    np.testing.assert_array_equal(table.logits, [[0.5, 2.0], [1.0, -1.0]])


def test_unknown_labels_are_null_and_read_as_minus_one(tmp_path):
    table = LogitTable.from_arrays(logits=np.eye(3), sample_id=[0, 1, 2], split="deploy", attack="clean",
                                   label=[2, -1, 0])
    assert table.arrow.column("label").null_count == 1 and not table.has_labels
    write_table(table, tmp_path / "t.parquet")
    np.testing.assert_array_equal(read_table(tmp_path / "t.parquet").labels, [2, -1, 0])


# -- writing safely ----------------------------------------------------------------------------


def test_write_refuses_to_overwrite_and_leaves_no_temp_files(digits_table, tmp_path):
    target = tmp_path / "t.parquet"
    target.write_text("the user's file")
    with pytest.raises(TableError, match=re.escape(f"refusing to overwrite existing file(s): {target};")):
        write_table(digits_table, target)
    assert target.read_text() == "the user's file"
    write_table(digits_table, target, overwrite=True)
    assert len(read_table(target)) == len(digits_table)
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_failed_write_removes_its_temp_file(digits_table, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        write_table(digits_table, tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


def test_partition_values_must_be_directory_names(tmp_path):
    table = LogitTable.from_arrays(logits=np.eye(2), sample_id=[0, 1], split="test", attack="art:a/b", label=[0, 1])
    with pytest.raises(TableError, match=re.escape("attack name 'art:a/b' cannot be a directory name")):
        write_table(table, tmp_path / "ds", partition_by=("split", "attack"))


# -- pairing and pandas ------------------------------------------------------------------------


def test_pair_aligns_by_sample_id_regardless_of_row_order(digits_table):
    shuffled = digits_table.take(np.random.default_rng(1).permutation(len(digits_table)))
    clean, attacked = pair(shuffled, "fgsm")
    assert set(clean.attack) == {"clean"} and set(attacked.attack) == {"fgsm"}
    np.testing.assert_array_equal(clean.sample_id, attacked.sample_id)
    np.testing.assert_array_equal(clean.labels, attacked.labels)
    # The pairing is the one the producer made: attacked logits differ, clean logits match the source.
    source = digits_table.select(attacks="clean")
    np.testing.assert_array_equal(clean.logits, source.logits[np.argsort(source.sample_id)][clean.sample_id])


def test_pair_errors(digits_table):
    with pytest.raises(TableError, match=re.escape("no 'pgd' rows in the table; it has attacks ['clean', 'fgsm']")):
        pair(digits_table, "pgd")
    labels = digits_table.labels.copy()
    n = len(labels) // 2
    labels[n] = (labels[n] + 1) % 10
    bad = LogitTable.from_arrays(logits=digits_table.logits, sample_id=digits_table.sample_id, split="test",
                                 attack=digits_table.attack, label=labels)
    with pytest.raises(TableError, match=re.escape(
            f"sample_id 0 (split 'test') has label {labels[0]} in clean rows but {labels[n]} in 'fgsm' rows")):
        pair(bad, "fgsm")


def test_to_pandas_long_and_wide(digits_table):
    long = to_pandas(digits_table)
    assert len(long) == len(digits_table)
    np.testing.assert_array_equal(long["logits"].iloc[5], digits_table.logits[5])
    wide = to_pandas(digits_table, wide=True)
    assert "logits" not in wide.columns
    np.testing.assert_array_equal(wide[digits_table.class_names].to_numpy(), digits_table.logits)
    assert wide["digit-7"].dtype == np.float32
    # Pandas auditing: per-attack mean logit of class 0 equals the NumPy computation.
    by_attack = wide.groupby("attack")["digit-0"].mean()
    assert by_attack["fgsm"] == pytest.approx(digits_table.logits[digits_table.attack == "fgsm", 0].mean(), rel=1e-6)


# -- validation: every error, with its exact message ----------------------------------------------


def _good_arrow() -> pa.Table:
    return LogitTable.from_arrays(
        logits=np.arange(12, dtype=np.float32).reshape(4, 3),
        sample_id=[0, 1, 0, 1], split="test", attack=["clean", "clean", "pgd", "pgd"], label=[0, 1, 0, 1],
        noisy_logits=np.zeros((4, 2, 3)),
    ).arrow


def _replace(arrow: pa.Table, name: str, values) -> pa.Table:
    return arrow.set_column(arrow.column_names.index(name), name, values)


def _ragged(rows) -> pa.Array:
    return pa.array(rows, pa.list_(pa.float32()))


_GOOD = _good_arrow()
_BAD_TABLES = {
    "missing column": (_GOOD.drop_columns(["label"]), "missing required column(s) ['label']"),
    "extra column": (
        _GOOD.append_column("image_path", pa.array(["a"] * 4)),
        "unexpected column(s) ['image_path']; allowed: ['sample_id', 'split', 'attack', 'label', 'logits', "
        "'noisy_logits', 'pred', 'success', 'linf', 'l2', 'features', 'insen', 'external_score', 'external_label', 'flagged']",
    ),
    "sample_id dtype": (
        _replace(_GOOD, "sample_id", pa.array(["0", "1", "0", "1"])),
        "column 'sample_id' has type string, expected int64",
    ),
    "label dtype": (
        _replace(_GOOD, "label", pa.array([0.0, 1.0, 0.0, 1.0])),
        "column 'label' has type double, expected int64",
    ),
    "logits not a list": (
        _replace(_GOOD, "logits", pa.array([1.0, 2.0, 3.0, 4.0])),
        "column 'logits' has type double, expected a list of float32 with shape (C)",
    ),
    "logits of strings": (
        _replace(_GOOD, "logits", pa.array([["a", "b", "c"]] * 4)),
        "column 'logits' holds string values, expected float32",
    ),
    "ragged logits": (
        _replace(_GOOD, "logits", _ragged([[1, 2, 3], [1, 2, 3], [1, 2], [1, 2, 3]])),
        "column 'logits': row 2 (split='test', attack='pgd', sample_id=0) has 2 values, expected 3 (num_classes)",
    ),
    "null logits row": (
        _replace(_GOOD, "logits", _ragged([[1, 2, 3], None, [1, 2, 3], [1, 2, 3]])),
        "column 'logits': row 1 (split='test', attack='clean', sample_id=1) is null",
    ),
    "nan logit": (
        _replace(_GOOD, "logits", _ragged([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, float("nan"), 3]])),
        "column 'logits': row 3 (split='test', attack='pgd', sample_id=1) contains nan (values must be finite)",
    ),
    "inf logit": (
        _replace(_GOOD, "logits", _ragged([[1, 2, 3], [float("-inf"), 2, 3], [1, 2, 3], [1, 2, 3]])),
        "column 'logits': row 1 (split='test', attack='clean', sample_id=1) contains -inf (values must be finite)",
    ),
    "nan in noisy logits": (
        _replace(_GOOD, "noisy_logits", pa.array(
            [[[0, 0, 0], [0, 0, 0]]] * 3 + [[[0, 0, 0], [0, float("nan"), 0]]], pa.list_(pa.list_(pa.float32())))),
        "column 'noisy_logits': row 3 (split='test', attack='pgd', sample_id=1) contains nan (values must be finite)",
    ),
    "noisy logits of wrong width": (
        _replace(_GOOD, "noisy_logits", pa.array([[[0, 0], [0, 0]]] * 4, pa.list_(pa.list_(pa.float32(), 2), 2))),
        "column 'noisy_logits' has 2 values per entry, expected 3 (num_classes)",
    ),
    "ragged noise queries": (
        _replace(_GOOD, "noisy_logits", pa.array(
            [[[0, 0, 0], [0, 0, 0]]] * 2 + [[[0, 0, 0]]] + [[[0, 0, 0], [0, 0, 0]]], pa.list_(pa.list_(pa.float32())))),
        "column 'noisy_logits': row 2 (split='test', attack='pgd', sample_id=0) has 1 values, expected 2",
    ),
    "label too large": (
        _replace(_GOOD, "label", pa.array([0, 1, 3, 1])),
        "column 'label': row 2 (split='test', attack='pgd', sample_id=0) is 3, expected 0 <= label < 3 (num_classes)",
    ),
    "negative label": (
        _replace(_GOOD, "label", pa.array([0, -2, 0, 1])),
        "column 'label': row 1 (split='test', attack='clean', sample_id=1) is -2, expected 0 <= label < 3 "
        "(num_classes)",
    ),
    "null split": (
        _replace(_GOOD, "split", pa.array(["test", None, "test", "test"])),
        "column 'split': row 1 (sample_id=1) is null",
    ),
    "duplicate key": (
        _replace(_GOOD, "sample_id", pa.array([0, 1, 0, 0])),
        "duplicate row for (split='test', attack='pgd', sample_id=0) at rows 2 and 3",
    ),
    "empty": (_GOOD.slice(0, 0), "the table has no rows"),
    "class names length": (
        _GOOD.replace_schema_metadata({METADATA_KEY: json.dumps({"class_names": ["a", "b"]})}),
        "metadata 'class_names' has 2 names, expected 3 (num_classes)",
    ),
    "num_classes disagrees": (
        _GOOD.replace_schema_metadata({METADATA_KEY: json.dumps({"num_classes": 4})}),
        "column 'logits' has 3 values per entry, expected 4 (num_classes)",
    ),
    "newer schema": (
        _GOOD.replace_schema_metadata({METADATA_KEY: json.dumps({"schema_version": 99})}),
        "table schema version 99 is not supported (this logitguard reads version 1 and older); upgrade logitguard",
    ),
    "bad metadata json": (
        _GOOD.replace_schema_metadata({METADATA_KEY: b"{not json"}),
        "schema metadata 'logitguard' is not valid JSON",
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD_TABLES))
def test_bad_table_is_refused_with_a_precise_message(case, tmp_path):
    arrow, message = _BAD_TABLES[case]
    path = tmp_path / "bad.parquet"
    pq.write_table(arrow, path)
    with pytest.raises(TableError) as info:
        read_table(path)
    text = str(info.value)
    if case == "bad metadata json":
        assert text.startswith(f"{path}: {message}")
    elif case == "empty":
        assert text == f"{path}: the table has no rows"
    else:
        assert text == message


def test_unreadable_inputs(tmp_path, digits_table):
    with pytest.raises(TableError, match=re.escape(f"no such file or directory: {tmp_path / 'nope'}")):
        read_table(tmp_path / "nope")
    text = tmp_path / "notes.parquet"
    text.write_text("sample_id,logits\n1,2\n")
    with pytest.raises(TableError, match=re.escape(f"{text}: not a readable Parquet table (")):
        read_table(text)
    write_table(digits_table, tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(TableError, match=re.escape(f"{tmp_path / 'cut.parquet'}: not a readable Parquet table (")):
        read_table(tmp_path / "cut.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TableError, match=re.escape(f"{tmp_path / 'empty_dir'}: directory holds no .parquet files")):
        read_table(tmp_path / "empty_dir")


def test_filters_and_column_requests_are_checked(digits_table, tmp_path):
    path = tmp_path / "t.parquet"
    write_table(digits_table, path)
    with pytest.raises(TableError, match=re.escape(
            f"{path}: no rows match split='train', attacks=None; the table has splits ['test'] and attacks "
            "['clean', 'fgsm']")):
        read_table(path, split="train")
    with pytest.raises(TableError, match=re.escape("unknown optional column(s) ['image']")):
        read_table(path, columns=["image"])
    with pytest.raises(TableError, match=re.escape(f"{path}: requested column(s) ['features'] not in the table")):
        read_table(path, columns=["features"])


def test_files_of_one_dataset_must_agree_on_metadata(digits_table, tmp_path):
    write_table(digits_table.select(attacks="clean"), tmp_path / "ds" / "a.parquet")
    other = LogitTable(digits_table.arrow, {**digits_table.metadata, "model": {"name": "other"}})
    write_table(other.select(attacks="fgsm"), tmp_path / "ds" / "b.parquet")
    with pytest.raises(TableError, match=re.escape("files disagree on metadata 'model'")):
        read_table(tmp_path / "ds")


def test_per_attack_metadata_is_merged_across_files(digits_table, tmp_path):
    clean = digits_table.select(attacks="clean")
    write_table(LogitTable(clean.arrow, {**clean.metadata, "attacks": {}}), tmp_path / "ds" / "a.parquet")
    write_table(digits_table.select(attacks="fgsm"), tmp_path / "ds" / "b.parquet")
    assert read_table(tmp_path / "ds").metadata["attacks"] == {"fgsm": {"eps": 0.15}}


def test_threat_metadata_is_merged_across_files_like_attacks(digits_table, tmp_path):
    fgsm = digits_table.select(attacks="fgsm")
    write_table(digits_table.select(attacks="clean"), tmp_path / "ds" / "a.parquet")  # no threat key at all
    write_table(LogitTable(fgsm.arrow, {**fgsm.metadata, "threat": {"fgsm": {"model": "oblivious"}}}),
                tmp_path / "ds" / "b.parquet")
    adaptive = LogitTable.from_arrays(logits=fgsm.logits, sample_id=fgsm.sample_id, split="test", attack="routes",
                                      label=fgsm.labels, noisy_logits=fgsm.noisy_logits,
                                      metadata={**fgsm.metadata, "threat": {
                                          "routes": {"model": "adaptive", "target": "ln-odds"}}})
    write_table(adaptive, tmp_path / "ds" / "c.parquet")
    assert read_table(tmp_path / "ds").metadata["threat"] == {
        "fgsm": {"model": "oblivious"}, "routes": {"model": "adaptive", "target": "ln-odds"}}


def test_from_arrays_checks_shapes():
    with pytest.raises(TableError, match=re.escape("logits must have shape (N, C), got shape (3,)")):
        LogitTable.from_arrays(logits=np.zeros(3), sample_id=[0, 1, 2], split="t", attack="clean")
    with pytest.raises(TableError, match=re.escape("attack must be a string or an array of shape (2,), got shape (3,)")):
        LogitTable.from_arrays(logits=np.zeros((2, 2)), sample_id=[0, 1], split="t", attack=["a", "b", "c"])
    with pytest.raises(TableError, match=re.escape("unknown optional column(s) ['image']")):
        LogitTable.from_arrays(logits=np.zeros((2, 2)), sample_id=[0, 1], split="t", attack="clean", image=[1, 2])


# -- filtered reads of nested columns ----------------------------------------------------------


def test_filtered_reads_keep_each_rows_noise_queries(digits_split_table, tmp_path):
    """pyarrow's filter kernel misreads noise queries in a sliced batch; the reader filters rows itself."""
    from logitguard.tables import iter_batches

    path = tmp_path / "one.parquet"
    write_table(digits_split_table, path)  # one row group: every batch of 7 rows is a slice of it
    train = digits_split_table.select(split="train", attacks=["clean", "bim"])
    streamed = list(iter_batches(path, split="train", attacks=["clean", "bim"], columns=["noisy_logits"],
                                 batch_rows=7))
    np.testing.assert_array_equal(np.concatenate([b.noisy_logits for b in streamed]), train.noisy_logits)
    np.testing.assert_array_equal(np.concatenate([b.sample_id for b in streamed]), train.sample_id)


def test_filtered_read_of_a_row_group_larger_than_a_scan_batch(tmp_path):
    n = 140_000  # pyarrow scans in batches of 131,072 rows: the second is a slice of the row group
    rng = np.random.default_rng(0)
    noisy = rng.standard_normal((n, 1, 2)).astype(np.float32)
    table = LogitTable.from_arrays(logits=rng.standard_normal((n, 2)), sample_id=np.arange(n), attack="clean",
                                   split=np.where(np.arange(n) % 2 == 0, "train", "test"), noisy_logits=noisy)
    write_table(table, tmp_path / "big.parquet")
    np.testing.assert_array_equal(read_table(tmp_path / "big.parquet", split="test").noisy_logits, noisy[1::2])
