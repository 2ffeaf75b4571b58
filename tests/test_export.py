"""The exporter on digits: valid tables, recomputed success flags, sharding, resume and determinism."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitguard import pair, read_table
from producers.cli import main, parse_params
from producers.errors import ProducerError
from producers.export.logits import export
from producers.export.plan import Shard
from producers.data.noise import NoiseRecipe, noise_queries

PARAMS = {"fgsm": {"eps": 0.1}, "pgd": {"eps": 0.1, "alpha": 0.02, "steps": 5}}


def _export(model, sets, out, **kwargs):
    train, test = sets
    options = dict(attacks=["clean", "fgsm", "pgd"], samples={"train": 120, "test": 80},
                   attack_samples={"pgd": 60}, noise=NoiseRecipe.parse("gaussian:0.05,sign:0.05", 3), progress=False)
    options.update(kwargs)
    options.setdefault("attack_params", {a: p for a, p in PARAMS.items() if a in options["attacks"]})
    return export(model, {"train": train, "test": test}, out=out, **options)


@pytest.fixture(scope="module")
def exported(digits_cnn, digits_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "table"
    report = _export(digits_cnn, digits_sets, out)
    return out, report


def test_export_writes_a_valid_partitioned_table(exported, digits_sets, digits_cnn):
    out, report = exported
    assert len(report.written) == 6 and not report.skipped
    table = read_table(out)
    assert table.attacks == ["clean", "fgsm", "pgd"] and table.splits == ["test", "train"]
    assert table.noisy_logits.shape == (len(table), 3, 10)
    counts = {(t["split"], t["attack"]): t["rows"] for t in report.timings}
    assert counts == {("train", "clean"): 120, ("train", "fgsm"): 120, ("train", "pgd"): 60,
                      ("test", "clean"): 80, ("test", "fgsm"): 80, ("test", "pgd"): 60}
    assert table.metadata["attacks"]["pgd"] == {"eps": 0.1, "alpha": 0.02, "steps": 5, "random_start": True}
    assert table.metadata["threat"] == {"fgsm": {"model": "oblivious", "attack": "fgsm", "eps": 0.1},
                                        "pgd": {"model": "oblivious", "attack": "pgd", "eps": 0.1}}
    assert table.metadata["noise"]["recipe"][1] == {"kind": "sign", "scale": 0.05}
    # Clean logits are the model's logits on the stored sample ids.
    test = table.select(split="test", attacks="clean")
    _, test_set = digits_sets
    with torch.no_grad():
        expected = digits_cnn(test_set.load(test.sample_id)).numpy()
    np.testing.assert_allclose(test.logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(test.labels, test_set.labels[test.sample_id])


def test_attacked_rows_carry_recomputed_success_and_norms(exported):
    table = read_table(exported[0], split="test")
    clean, attacked = pair(table, "pgd")
    y = clean.labels
    expected = (clean.logits.argmax(1) == y) & (attacked.logits.argmax(1) != y)
    np.testing.assert_array_equal(attacked.column("success"), expected)
    np.testing.assert_array_equal(attacked.column("pred"), attacked.logits.argmax(1))
    assert (attacked.column("linf") <= 0.1 + 1e-6).all() and attacked.column("linf").max() > 0.09
    assert not clean.column("success").any() and (clean.column("l2") == 0).all()
    assert expected.mean() > 0.2  # the attack really attacks


def test_noise_queries_are_the_model_on_noisy_inputs(digits_cnn, digits_sets):
    _, test = digits_sets
    x = test.load(np.arange(16))
    recipe = NoiseRecipe.parse("gaussian:0.05,uniform:0.1,sign:0.02", 3)
    gen = torch.Generator().manual_seed(3)
    logits = noise_queries(digits_cnn, x, recipe, generator=gen, batch_size=5)
    assert logits.shape == (16, 3, 10)
    gen = torch.Generator().manual_seed(3)
    noise = recipe.sample(x.shape, gen, torch.device("cpu"))
    assert torch.allclose(noise[:, 2].abs(), torch.full_like(noise[:, 2], 0.02))
    assert noise[:, 1].abs().max() <= 0.1 and 0.03 < noise[:, 0].std() < 0.07
    with torch.no_grad():
        clean = digits_cnn(x)
    # Small noise moves the logits, but not far.
    assert 0 < (logits - clean[:, None]).abs().mean() < clean.abs().mean()


def test_export_resumes_and_is_deterministic(digits_cnn, digits_sets, exported, tmp_path):
    out, _ = exported
    again = _export(digits_cnn, digits_sets, out)
    assert not again.written and len(again.skipped) == 6
    other = tmp_path / "other"
    _export(digits_cnn, digits_sets, other, attacks=["clean", "pgd"])
    a, b = read_table(out, attacks=["clean", "pgd"]), read_table(other)
    ka, kb = (np.lexsort((t.sample_id, t.attack, t.split)) for t in (a, b))
    np.testing.assert_array_equal(a.logits[ka], b.logits[kb])
    np.testing.assert_array_equal(a.noisy_logits[ka], b.noisy_logits[kb])
    # Removing one partition and rerunning rebuilds exactly that one.
    victim = other / "split=test" / "attack=pgd" / "shard-0-of-1.parquet"
    victim.unlink()
    report = _export(digits_cnn, digits_sets, other, attacks=["clean", "pgd"])
    assert report.written == [victim] and len(report.skipped) == 3


def test_shards_partition_the_samples(digits_cnn, digits_sets, exported, tmp_path):
    out = tmp_path / "sharded"
    for i in range(3):
        _export(digits_cnn, digits_sets, out, attacks=["clean", "fgsm"], shard=Shard(i, 3))
    sharded = read_table(out)
    whole = read_table(exported[0], attacks=["clean", "fgsm"])
    assert len(list(out.rglob("*.parquet"))) == 12
    s, w = (np.lexsort((t.sample_id, t.attack, t.split)) for t in (sharded, whole))
    np.testing.assert_array_equal(sharded.sample_id[s], whole.sample_id[w])
    np.testing.assert_allclose(sharded.logits[s], whole.logits[w], rtol=1e-5, atol=1e-5)


def test_bad_requests_fail_early(digits_cnn, digits_sets, tmp_path):
    with pytest.raises(ProducerError, match=re.escape("unknown attack 'pgdd'")):
        _export(digits_cnn, digits_sets, tmp_path / "x", attacks=["clean", "pgdd"])
    with pytest.raises(ProducerError, match=re.escape("parameters given for attack(s) ['pgd'] that are not being run")):
        _export(digits_cnn, digits_sets, tmp_path / "x", attacks=["clean", "fgsm"], attack_params=PARAMS)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ProducerError, match=re.escape("--shard must look like I/N (e.g. 0/4), got '2'")):
        Shard.parse("2")
    with pytest.raises(ProducerError, match=re.escape("--shard 3/3: need 0 <= I < N")):
        Shard.parse("3/3")
    with pytest.raises(ProducerError, match=re.escape("unknown noise kind 'pink' in 'pink:0.1'")):
        NoiseRecipe.parse("pink:0.1", 4)


def test_param_parsing():
    assert parse_params(["pgd.eps=8/255", "pgd.steps=20", "pgd.random_start=false", "cw.confidence=0.5"]) == {
        "pgd": {"eps": 8 / 255, "steps": 20, "random_start": False}, "cw": {"confidence": 0.5}}
    with pytest.raises(ProducerError, match=re.escape("--param 'eps=0.1' must look like ATTACK.NAME=VALUE")):
        parse_params(["eps=0.1"])
    with pytest.raises(ProducerError, match=re.escape("--param 'pgd.eps=big': cannot read 'big' as a number")):
        parse_params(["pgd.eps=big"])


def test_cli_train_then_export_then_inspect(tmp_path):
    runner = CliRunner()
    stem = tmp_path / "digits-cnn"
    result = runner.invoke(main, ["train", "--dataset", "digits", "--epochs", "3", "--out", str(stem), "--json"])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    assert trained["test_accuracy"] > 0.5
    assert json.loads(stem.with_suffix(".json").read_text())["arch"] == "small-cnn"
    result = runner.invoke(main, ["train", "--dataset", "digits", "--epochs", "1", "--out", str(stem)])
    assert result.exit_code == 1 and "refusing to overwrite existing file(s)" in result.output
    out = tmp_path / "table"
    args = ["export", "--dataset", "digits", "--model", str(stem), "--attacks", "clean,fgsm",
            "--param", "fgsm.eps=0.1", "--train-samples", "50", "--test-samples", "40", "--noise-queries", "2",
            "--out", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"wrote 4 file(s), skipped 0 existing under {out}"
    result = runner.invoke(main, args)
    assert result.stdout.splitlines()[-1] == f"wrote 0 file(s), skipped 4 existing under {out}"
    table = read_table(out)
    assert len(table) == 180 and table.noisy_logits.shape[1] == 2
    assert table.metadata["model"]["arch"] == "small-cnn" and table.metadata["dataset"] == {"name": "digits"}
    result = runner.invoke(main, ["export", "--dataset", "digits", "--model", str(stem), "--attacks", "clean,xyz",
                                  "--out", str(tmp_path / "t2")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: unknown attack 'xyz'; known: ['fgsm', 'bim', 'pgd', 'mim', 'deepfool', 'cw']")
