"""The logit corrector on real digits logits: it corrects, it round-trips, it refuses bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from logitguard import LogitguardError, pair, write_table
from logitguard.tables import TableSource, holdout_mask
from logitguard.defenses.corrector import LogitCorrector
from logitguard.defenses.corrector_training import paired_batches, validation_scores

FAST = dict(hidden=256, epochs=40, lr=1e-3, progress=False)


@pytest.fixture(scope="module")
def fgsm_corrector(digits_train):
    return LogitCorrector(**FAST).fit_table(digits_train, "fgsm")


@pytest.fixture(scope="module")
def fgsm_test(digits_split_table):
    return pair(digits_split_table.select(split="test"), "fgsm")


def test_correction_recovers_attacked_rows(fgsm_corrector, fgsm_test):
    clean, attacked = fgsm_test
    undefended = (attacked.logits.argmax(1) == attacked.labels).mean()
    corrected = fgsm_corrector.score(attacked.logits, attacked.labels)
    assert undefended < 0.40
    assert corrected > undefended + 0.12
    # The clean/attacked mix keeps most clean accuracy (the model's own is ~90%).
    assert fgsm_corrector.score(clean.logits, clean.labels) > 0.70


def test_correct_returns_logits_whose_argmax_is_predict(fgsm_corrector, fgsm_test):
    logits = fgsm_test.attacked.logits
    corrected = fgsm_corrector.correct(logits)
    assert corrected.shape == logits.shape and corrected.dtype == np.float32
    np.testing.assert_array_equal(corrected.argmax(1), fgsm_corrector.predict(logits))


def test_save_load_round_trip_gives_identical_predictions(fgsm_corrector, fgsm_test, tmp_path):
    path = fgsm_corrector.save(tmp_path / "c.pt")
    loaded = LogitCorrector.load(path)
    logits = fgsm_test.attacked.logits
    np.testing.assert_array_equal(loaded.correct(logits), fgsm_corrector.correct(logits))
    assert loaded.get_params() == {**fgsm_corrector.get_params(), "progress": False}
    assert loaded.class_names_ == [f"digit-{i}" for i in range(10)] and loaded.attacks_ == ["fgsm"]
    assert loaded.history_ == fgsm_corrector.history_


def test_save_refuses_to_overwrite(fgsm_corrector, tmp_path):
    target = tmp_path / "c.pt"
    target.write_text("the user's file")
    with pytest.raises(LogitguardError, match=re.escape(f"refusing to overwrite existing file(s): {target};")):
        fgsm_corrector.save(target)
    assert target.read_text() == "the user's file"
    fgsm_corrector.save(target, overwrite=True)
    assert LogitCorrector.load(target).n_classes_ == 10


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("content", ["not torch", "pickle", "foreign dict"])
def test_load_refuses_files_that_are_not_correctors(tmp_path, content, capsys):
    path = tmp_path / "bad.pt"
    if content == "not torch":
        path.write_text("hello")
    elif content == "pickle":
        torch.save({"format": "logitguard.LogitCorrector", "payload": _Exploit()}, path)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(LogitguardError, match=f"^{re.escape(str(path))}: not a logitguard corrector file"):
        LogitCorrector.load(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_training_is_reproducible_under_a_seed(digits_train, fgsm_test):
    logits = fgsm_test.attacked.logits
    params = dict(FAST, epochs=3)
    a = LogitCorrector(seed=1, **params).fit_table(digits_train, "fgsm").correct(logits)
    b = LogitCorrector(seed=1, **params).fit_table(digits_train, "fgsm").correct(logits)
    c = LogitCorrector(seed=2, **params).fit_table(digits_train, "fgsm").correct(logits)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_training_leaves_the_global_torch_random_state_alone(digits_train):
    before = torch.get_rng_state()
    LogitCorrector(**dict(FAST, epochs=1)).fit_table(digits_train, "fgsm")
    assert torch.equal(torch.get_rng_state(), before)


def test_each_sample_shows_clean_logits_with_probability_p_clean():
    n = 20000
    clean, attacked = np.zeros((n, 2), np.float32), np.ones((n, 2), np.float32)
    corrector = LogitCorrector(p_clean=0.3, batch_size=1000)
    batches = list(paired_batches(clean, attacked, np.zeros(n, np.int64), np.random.default_rng(0),
                                  p_clean=corrector.p_clean, batch_size=corrector.batch_size))
    shown = torch.cat([x for x, _ in batches])
    assert shown.shape == (n, 2)  # every sample exactly once per epoch
    assert (shown[:, 0] == shown[:, 1]).all()  # a row is wholly clean or wholly attacked
    assert (shown[:, 0] == 0).float().mean().item() == pytest.approx(0.3, abs=0.015)


def test_validation_keeps_the_best_epoch(digits_train, digits_split_table):
    corrector = LogitCorrector(**dict(FAST, epochs=30), validation_fraction=0.25, patience=3)
    corrector.fit_table(digits_train, "fgsm")
    scores = [h["val_score"] for h in corrector.history_]
    assert corrector.best_epoch_ == 1 + int(np.argmax(scores))
    assert len(scores) == 30 or len(scores) == corrector.best_epoch_ + 3  # ran out, or stopped early
    # The kept weights are the best epoch's: re-validating them reproduces its score.
    train = pair(digits_split_table.select(split="train"), "fgsm")
    held = holdout_mask(train.clean.sample_id, 0.25, corrector.seed)
    assert 0.15 < held.mean() < 0.35
    again = validation_scores(corrector, train.clean.logits[held], train.attacked.logits[held],
                              train.clean.labels[held])
    assert again["val_score"] == pytest.approx(max(scores))


def test_several_attacks_mix_into_one_training_set(digits_train, digits_split_table):
    corrector = LogitCorrector(**FAST).fit_table(digits_train, ["fgsm", "bim"])
    assert corrector.attacks_ == ["fgsm", "bim"]
    test = digits_split_table.select(split="test")
    for attack in ("fgsm", "bim"):
        rows = pair(test, attack).attacked
        assert corrector.score(rows.logits, rows.labels) > (rows.logits.argmax(1) == rows.labels).mean() + 0.1


def test_streaming_from_parquet_matches_in_memory_training(digits_split_table, fgsm_test, tmp_path):
    path = tmp_path / "table"
    write_table(digits_split_table, path, partition_by=("split", "attack"))
    streamed = LogitCorrector(**FAST).fit_table(TableSource(path, split="train"), "fgsm", stream=True, buffer_rows=128)
    in_memory = LogitCorrector(**FAST).fit_table(TableSource(path, split="train"), "fgsm")
    attacked = fgsm_test.attacked
    assert streamed.score(attacked.logits, attacked.labels) == pytest.approx(
        in_memory.score(attacked.logits, attacked.labels), abs=0.06)
    assert streamed.score(attacked.logits, attacked.labels) > (attacked.logits.argmax(1) == attacked.labels).mean() + 0.1


def test_streaming_validation_holds_out_whole_samples(digits_split_table, tmp_path):
    path = tmp_path / "t.parquet"
    write_table(digits_split_table, path)
    corrector = LogitCorrector(**dict(FAST, epochs=5), validation_fraction=0.25)
    corrector.fit_table(TableSource(path, split="train"), "fgsm", stream=True)
    assert len(corrector.history_) == 5 and all("val_score" in h for h in corrector.history_)


def test_correct_table_replaces_logits_and_records_the_corrector(fgsm_corrector, digits_split_table):
    corrected = fgsm_corrector.correct_table(digits_split_table)
    np.testing.assert_array_equal(corrected.logits, fgsm_corrector.correct(digits_split_table.logits))
    np.testing.assert_array_equal(corrected.column("pred"), corrected.logits.argmax(1))
    np.testing.assert_array_equal(corrected.labels, digits_split_table.labels)
    assert corrected.noisy_logits is None and "linf" in corrected.columns
    assert corrected.metadata["corrected_by"]["attacks"] == ["fgsm"]


@pytest.mark.parametrize("params, message", [
    ({"p_clean": 1.5}, "p_clean must be in [0, 1], got 1.5"),
    ({"hidden": 0}, "hidden must be an integer >= 1, got 0"),
    ({"validation_fraction": 1.0}, "validation_fraction must be in [0, 1), got 1.0"),
])
def test_bad_parameters_are_refused(digits_train, params, message):
    corrector = LogitCorrector(**params)  # scikit-learn style: parameters are stored as given, checked by fit
    assert corrector.get_params()[next(iter(params))] == next(iter(params.values()))
    with pytest.raises(LogitguardError, match=f"^{re.escape(message)}$"):
        corrector.fit_table(digits_train, "fgsm")


def test_bad_inputs_are_refused(digits_train, fgsm_corrector):
    with pytest.raises(LogitguardError, match=re.escape("not fitted yet")):
        LogitCorrector().predict(np.zeros((2, 10)))
    with pytest.raises(LogitguardError, match=re.escape("logits have 3 classes; expected 10")):
        fgsm_corrector.predict(np.zeros((2, 3)))
    with pytest.raises(LogitguardError, match=re.escape("logits contain NaN or infinite values")):
        fgsm_corrector.predict(np.full((2, 10), np.nan))
    with pytest.raises(LogitguardError, match=re.escape("name attacked partitions to learn from, not 'clean'")):
        LogitCorrector(**FAST).fit_table(digits_train, "clean")
    with pytest.raises(LogitguardError, match=re.escape("every training row needs its true label")):
        LogitCorrector(**FAST).fit(np.zeros((4, 3)), np.zeros((4, 3)), np.array([0, 1, -1, 2]))
    with pytest.raises(LogitguardError, match=re.escape("stream=True needs the path of a table")):
        LogitCorrector(**FAST).fit_table(digits_train, "fgsm", stream=True)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_inference_pipeline_matches_the_cpu(fgsm_corrector, digits_split_table, tmp_path):
    """The streamed GPU path (pinned buffers, copy streams) gives the CPU's corrected logits."""
    gpu = LogitCorrector.load(fgsm_corrector.save(tmp_path / "c.npz"), device="cuda")
    logits = np.tile(digits_split_table.logits, (200, 1))  # more rows than one GPU chunk
    np.testing.assert_allclose(gpu.correct(logits), fgsm_corrector.correct(logits), rtol=1e-4, atol=1e-4)


def test_streamed_validation_pairs_are_the_held_out_pairs(digits_split_table, tmp_path):
    """The streamed validation set (filled in place, one copy) is every held-out sample's clean/attacked pair,
    per attack in sample-id order, as pairing the loaded table gives it."""
    from logitguard import pair
    from logitguard.defenses.corrector_training import stream_validation
    from logitguard.tables import holdout_mask

    path = tmp_path / "table"
    write_table(digits_split_table, path, partition_by=("split", "attack"))
    corrector = LogitCorrector(**FAST, validation_fraction=0.25)
    (clean, attacked, labels), num_classes, _ = stream_validation(corrector, TableSource(path, split="train"), ["fgsm", "bim"])
    train = digits_split_table.select(split="train")
    parts = []
    for name in ("fgsm", "bim"):
        p = pair(train, name)
        held = np.flatnonzero(holdout_mask(p.clean.sample_id, 0.25, corrector.seed))
        held = held[np.argsort(p.clean.sample_id[held])]
        parts.append((p.clean.logits[held], p.attacked.logits[held], p.clean.labels[held]))
    assert num_classes == train.num_classes and 0 < len(labels) < len(train)
    for got, want in zip((clean, attacked, labels), zip(*parts)):
        np.testing.assert_array_equal(got, np.concatenate(want))
