"""Attack aliases, threat metadata and the transfer tier (attacks through a substitute model), on digits."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitguard import read_table
from producers.attacks.pgd import PGD
from producers.cli import main, parse_params
from producers.export.logits import export
from producers.models.classifiers import load_model, save_model, small_cnn_for, train_classifier
from producers.data.noise import NoiseRecipe

# No random start: the attacked images can be recomputed by hand below.
PGD_PARAMS = {"alpha": 0.05, "steps": 5, "random_start": False}
PARAMS = {"pgd": {"eps": 0.1, **PGD_PARAMS}, "pgd-e2": {"eps": 0.2, **PGD_PARAMS}}
ATTACKS = ["clean", "pgd", "pgd-e2=pgd"]
TEST_SAMPLES = 200


@pytest.fixture(scope="module")
def substitute(digits_sets, tmp_path_factory):
    """The attacker's own model: another seed and width than `digits_cnn`, saved as a stem."""
    train, _ = digits_sets
    model = train_classifier(small_cnn_for(train, width=16), train, epochs=8, seed=1, progress=False)
    stem = tmp_path_factory.mktemp("substitute") / "sub"
    save_model(model, stem)
    return stem


@pytest.fixture(scope="module")
def table_dir(digits_cnn, digits_sets, substitute, tmp_path_factory):
    """One table: clean, white-box pgd at two budgets, and the same two attacks through the substitute."""
    _, test = digits_sets
    out = tmp_path_factory.mktemp("transfer") / "table"
    options = dict(attacks=ATTACKS, samples={"test": TEST_SAMPLES}, attack_params=PARAMS,
                   noise=NoiseRecipe.parse("gaussian:0.05", 2), progress=False)
    export(digits_cnn, {"test": test}, out=out, **options)
    report = export(digits_cnn, {"test": test}, out=out, substitute=substitute, **options)
    # clean is the same rows with or without a substitute: found and skipped, not written twice.
    assert [p.parent.name for p in report.skipped] == ["attack=clean"]
    return out


def test_aliases_give_one_partition_per_budget(table_dir):
    table = read_table(table_dir)
    assert table.attacks == ["clean", "pgd", "pgd-e2", "transfer-pgd", "transfer-pgd-e2"]
    attacks = table.metadata["attacks"]
    assert attacks["pgd"] == {"eps": 0.1, **PGD_PARAMS}  # no alias: the params alone, as before
    assert attacks["pgd-e2"] == {"eps": 0.2, **PGD_PARAMS, "attack": "pgd"}
    threat = table.metadata["threat"]
    assert threat["pgd"] == {"model": "oblivious", "attack": "pgd", "eps": 0.1}
    assert threat["pgd-e2"] == {"model": "oblivious", "attack": "pgd", "eps": 0.2}
    assert "clean" not in threat
    for name, eps in [("pgd", 0.1), ("pgd-e2", 0.2), ("transfer-pgd", 0.1), ("transfer-pgd-e2", 0.2)]:
        linf = table.select(attacks=name).column("linf")
        assert len(linf) == TEST_SAMPLES and linf.max() <= eps + 1e-6 and linf.max() > eps - 0.01


def test_transfer_partitions_record_the_substitute(table_dir, substitute):
    table = read_table(table_dir)
    sub = json.loads(substitute.with_suffix(".json").read_text())
    sha256 = hashlib.sha256(substitute.with_suffix(".pt").read_bytes()).hexdigest()
    expected = {"spec": str(substitute), "sha256": sha256, "test_accuracy": None, "arch": "small-cnn", "width": 16}
    assert sub["width"] == 16
    for name, eps in [("transfer-pgd", 0.1), ("transfer-pgd-e2", 0.2)]:
        assert table.metadata["threat"][name] == {"model": "transfer", "attack": "pgd", "eps": eps,
                                                  "substitute": expected}
        assert table.metadata["attacks"][name] == {"eps": eps, **PGD_PARAMS, "attack": "pgd"}


def test_transfer_rows_are_the_target_on_images_attacked_through_the_substitute(
        table_dir, digits_cnn, digits_sets, substitute):
    _, test = digits_sets
    table = read_table(table_dir, split="test")
    transfer = table.select(attacks="transfer-pgd-e2")
    white_box = table.select(attacks="pgd-e2")
    np.testing.assert_array_equal(transfer.sample_id, white_box.sample_id)
    rows = transfer.sample_id[:12]
    x, y = test.load(rows), torch.as_tensor(test.labels[rows])
    attacker = load_model(substitute)
    x_adv = PGD(attacker, eps=0.2, **PGD_PARAMS)(x, y)
    with torch.no_grad():
        target_logits, clean_pred = digits_cnn(x_adv).numpy(), digits_cnn(x).argmax(1).numpy()
        substitute_logits = attacker(x_adv).numpy()
    np.testing.assert_allclose(transfer.logits[:12], target_logits, rtol=1e-5, atol=1e-5)
    assert np.abs(transfer.logits[:12] - substitute_logits).max() > 1.0  # not the attacker's logits
    np.testing.assert_array_equal(transfer.column("pred")[:12], target_logits.argmax(1))
    success = (clean_pred == y.numpy()) & (target_logits.argmax(1) != y.numpy())
    np.testing.assert_array_equal(transfer.column("success")[:12], success)
    # Noise queries are the target's too: around its logits, far from the substitute's.
    noisy = transfer.noisy_logits[:12].mean(1)
    assert np.abs(noisy - target_logits).mean() < np.abs(noisy - substitute_logits).mean()
    # Other images than the white-box attack's.
    assert np.abs(transfer.logits - white_box.logits).max() > 1.0


def test_transfer_attacks_succeed_less_often_than_white_box(table_dir):
    table = read_table(table_dir)
    success = {a: table.select(attacks=a).column("success").mean() for a in table.attacks}
    assert success["transfer-pgd"] < success["pgd"] and success["transfer-pgd-e2"] < success["pgd-e2"]
    assert success["transfer-pgd-e2"] > 0.1  # yet they do transfer


def test_alias_params_parse_with_dots():
    assert parse_params(["pgd.e8.eps=8/255", "pgd-eps8.steps=20"]) == {
        "pgd.e8": {"eps": 8 / 255}, "pgd-eps8": {"steps": 20}}


@pytest.fixture(scope="module")
def target_stem(digits_cnn, tmp_path_factory):
    stem = tmp_path_factory.mktemp("target") / "cnn"
    save_model(digits_cnn, stem)
    return stem


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "clean,PGD8=pgd"], "attack alias 'PGD8' in 'PGD8=pgd' must be lowercase letters, digits, '-', "
                                      "'_' or '.', starting with a letter or digit"),
    (["--attacks", "clean,pgd8="], "attack alias 'pgd8=' names no attack; write ALIAS=ATTACK, e.g. pgd-eps8=pgd"),
    (["--attacks", "clean,pgd,pgd"], "attack name(s) ['pgd'] requested more than once; give each run its own "
                                     "alias, e.g. pgd-eps8=pgd"),
    (["--attacks", "clean,transfer-x=pgd"], "attack alias 'transfer-x': the prefix 'transfer-' is reserved for "
                                            "transfer partitions (--substitute)"),
    (["--attacks", "clean,base=clean"], "'base=clean': 'clean' (the unattacked images) cannot be aliased or be an "
                                        "alias"),
    (["--attacks", "clean,p8=pgdd"], "unknown attack 'pgdd'; known: ['fgsm', 'bim', 'pgd', 'mim', 'deepfool', "
                                     "'cw'] or art:<ClassName>"),
    (["--attacks", "pgd", "--param", "pgd.epsilon=0.1"],
     "unknown parameter(s) ['epsilon'] for attack pgd; accepted: ['eps', 'alpha', 'steps', 'random_start']"),
    (["--attacks", "p8=pgd", "--param", "p8.epsilon=0.1"],
     "unknown parameter(s) ['epsilon'] for attack p8 (pgd); accepted: ['eps', 'alpha', 'steps', 'random_start']"),
    (["--attacks", "p8=pgd", "--param", "pgd.eps=0.1"],
     "parameters given for attack(s) ['pgd'] that are not being run"),
    (["--attacks", "pgd", "--param", "pgd.eps=-8/255"],
     f"attack pgd: eps must be a number in (0, 1], got {-8 / 255!r}"),
    (["--attacks", "fgsm", "--param", "fgsm.eps=0"], "attack fgsm: eps must be a number in (0, 1], got 0"),
    (["--attacks", "fgsm", "--param", "fgsm.eps=2"], "attack fgsm: eps must be a number in (0, 1], got 2"),
    (["--attacks", "pgd", "--param", "pgd.random_start=5"], "attack pgd: random_start must be true or false, got 5"),
    (["--attacks", "mim", "--param", "mim.decay=-1"], "attack mim: decay must be a number >= 0, got -1"),
    (["--attacks", "deepfool", "--param", "deepfool.candidates=1"],
     "attack deepfool: candidates must be an integer >= 2, got 1"),
    (["--attacks", "deepfool", "--param", "deepfool.overshoot=-0.5"],
     "attack deepfool: overshoot must be a number >= 0, got -0.5"),
    (["--attacks", "cw", "--param", "cw.lr=0"], "attack cw: lr must be a positive number, got 0"),
    (["--attacks", "bim", "--param", "bim.steps=0"], "attack bim: steps must be a positive integer, got 0"),
    (["--attacks", "cw", "--param", "cw.steps=2.5"], "attack cw: steps must be a positive integer, got 2.5"),
    (["--attacks", "clean", "--param", "clean.eps=1"], "'clean' takes no parameters, got ['eps']"),
    (["--test-samples", "0"], "--test-samples must be at least 1, got 0"),
    (["--train-samples", "-5"], "--train-samples must be at least 1, got -5"),
    (["--noise-queries", "-1"], "--noise-queries must be 0 (none) or more, got -1"),
    (["--max-samples", "pgd=0"], "--max-samples item 'pgd=0': N must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
])
def test_export_validation_fails_before_any_work(tmp_path, extra, message):
    # The model does not exist: every one of these fails before a model or dataset is loaded.
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", "--dataset", "digits", "--model", str(tmp_path / "none"),
                                       "--out", str(out), *extra])
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--width", "-1"], "--width must be at least 1, got -1"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
])
def test_train_validation(tmp_path, extra, message):
    result = CliRunner().invoke(main, ["train", "--dataset", "digits", "--out", str(tmp_path / "m"), *extra])
    assert result.exit_code == 1 and result.output == f"Error: {message}\n"


def test_train_refuses_to_overwrite_before_training(target_stem):
    result = CliRunner().invoke(main, ["train", "--dataset", "digits", "--epochs", "100", "--out", str(target_stem)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: refusing to overwrite existing file(s): {target_stem}.pt")


def test_export_refuses_an_out_that_disagrees(target_stem, tmp_path):
    runner = CliRunner()
    out = tmp_path / "t"
    base = ["export", "--dataset", "digits", "--model", str(target_stem), "--test-samples", "20",
            "--train-samples", "20", "--noise-queries", "0", "--out", str(out)]
    result = runner.invoke(main, [*base, "--attacks", "clean,fgsm", "--param", "fgsm.eps=0.1"])
    assert result.exit_code == 0, result.output
    files = sorted(out.rglob("*.parquet"))
    # The same name at another budget would be skipped as "done" or mix two budgets under one name.
    result = runner.invoke(main, [*base, "--attacks", "clean,fgsm", "--param", "fgsm.eps=0.2"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {out} already holds attack 'fgsm' with attacks {{'eps': 0.1}} (")
    assert result.output.endswith("this export would write {'eps': 0.2}; use another alias or --out\n")
    # Another seed selects other samples: the reader would refuse the mixed table.
    result = runner.invoke(main, [*base, "--attacks", "fgsm2=fgsm", "--seed", "1"])
    assert result.exit_code == 1 and "already holds a table with a different 'seed'" in result.output
    assert sorted(out.rglob("*.parquet")) == files  # nothing was written by the refused runs
    # An alias at the other budget is added to the same table.
    result = runner.invoke(main, [*base, "--attacks", "clean,fgsm2=fgsm", "--param", "fgsm2.eps=0.2"])
    assert result.exit_code == 0, result.output
    assert read_table(out).attacks == ["clean", "fgsm", "fgsm2"]


def test_cli_trains_a_substitute_and_exports_transfer_rows(target_stem, tmp_path):
    runner = CliRunner()
    stem = tmp_path / "sub"
    result = runner.invoke(main, ["train", "--dataset", "digits", "--epochs", "2", "--width", "8", "--seed", "7",
                                  "--out", str(stem), "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads(stem.with_suffix(".json").read_text())
    assert config["width"] == 8 and config["train"]["seed"] == 7
    out = tmp_path / "t"
    result = runner.invoke(main, ["export", "--dataset", "digits", "--model", str(target_stem), "--substitute",
                                  str(stem), "--attacks", "clean,fgsm,f8=fgsm", "--param", "f8.eps=8/255",
                                  "--test-samples", "30", "--train-samples", "20", "--noise-queries", "1",
                                  "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    table = read_table(out)
    assert table.attacks == ["clean", "transfer-f8", "transfer-fgsm"]
    threat = table.metadata["threat"]
    assert threat["transfer-f8"]["eps"] == 8 / 255 and threat["transfer-fgsm"]["eps"] == 16 / 255
    assert {t["model"] for t in threat.values()} == {"transfer"}
    assert threat["transfer-fgsm"]["substitute"]["spec"] == str(stem)
    assert threat["transfer-fgsm"]["substitute"]["test_accuracy"] == config["test_accuracy"]
    assert threat["transfer-fgsm"]["substitute"]["seed"] == 7
    assert table.metadata["model"]["spec"] == str(target_stem)  # the judged model is the target
