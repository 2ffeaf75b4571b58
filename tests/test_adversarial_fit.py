"""Adversarial fitting of a detector (issue 22, step 1), on digits with the small CNN.

One small world for the module, as tests/test_adaptive.py: a digits table (clean and PGD rows with noise
queries; 600 train samples, 300 test samples whose clean rows are the held-out rows), ``ln-reject`` fitted on
it, and one two-round adversarial fit of it with a short suite. Settings are tiny so each test runs in
seconds; what the fit is worth must be measured on the test split with the full suite, not here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from logitguard import read_table
from logitguard.defenses.pipelines import load_pipelines, manifest_provenance, save_pipelines
from logitguard.defenses.recipe import package_pipeline
from logitguard.defenses.shipped import fit_shipped
from logitguard.tables import holdout_mask
from producers.data.noise import NoiseRecipe
from producers.export.logits import export
from producers.threat.adversarial_fit import fit_adversarially, format_rounds, round_prefix
from producers.threat.export import partition_name

EPS = 0.15
RECIPE = NoiseRecipe.parse("gaussian:0.05,uniform:0.1", 4)
PARAMS = {"steps": 6, "restarts": 1, "sequence": ["apgd-ce", "lagrangian"]}
SAMPLES = 150


def clean_wrong(table_dir) -> np.ndarray:
    """Train sample ids whose clean row the model gets wrong (a defense-aware export leaves them out)."""
    clean = read_table(table_dir, split="train", attacks=["clean"], columns=[])
    return clean.sample_id[clean.logits.argmax(axis=1) != clean.labels]


def run_fit(model, train, table, manifest, workdir, rounds=2):
    return fit_adversarially(model, train, table=table, defenses=manifest, workdir=workdir, rounds=rounds,
                             samples=SAMPLES, attacks=("suite",), attack_params=PARAMS, budgets=(EPS,),
                             judge_draws=2, batch_size=150, tolerance=0.0, seed=0, progress=False)


@pytest.fixture(scope="module")
def world(digits_cnn, digits_sets, tmp_path_factory):
    """(root, table dir, start manifest): the table as it was before any fit, and ln-reject fitted on it."""
    root = tmp_path_factory.mktemp("advfit")
    train, test = digits_sets
    export(digits_cnn, {"train": train, "test": test}, attacks=["clean", "pgd"], out=root / "table",
           samples={"train": 600, "test": 300}, attack_params={"pgd": {"eps": EPS, "alpha": 0.04, "steps": 8}},
           noise=RECIPE, progress=False)
    manifest = fit_shipped(read_table(root / "table", split="train"), root / "start", attacks=["pgd"],
                           pipelines=["ln-reject"])
    return root, root / "table", manifest


@pytest.fixture(scope="module")
def fitted(world, digits_cnn, digits_sets, tmp_path_factory):
    """Two rounds of adversarial fitting on a copy of the table: (table dir, AdversarialFit)."""
    root, table_dir, manifest = world
    work = tmp_path_factory.mktemp("advfit-run")
    shutil.copytree(table_dir, work / "table")
    fit = run_fit(digits_cnn, digits_sets[0], work / "table", manifest, work / "fit")
    return work / "table", fit


def test_round_partitions_land_in_the_train_split_with_their_threat_entries(world, fitted):
    _, _, start = world
    table_dir, fit = fitted
    assert [r.round for r in fit.rounds] == [1, 2]
    train = read_table(table_dir, split="train", columns=[])
    test = read_table(table_dir, split="test", columns=[])
    attacked = [start, fit.rounds[0].manifest]  # round r attacks round r-1's files
    for r, manifest in zip((1, 2), attacked):
        name = partition_name(round_prefix(r), "ln-reject", "suite", EPS)
        assert name == f"adaptive-round{r}.ln-reject.suite.e38"
        assert name in train.attacks and name not in test.attacks
        entry = train.metadata["threat"][name]
        assert entry["model"] == "adaptive" and entry["target"] == "ln-reject" and entry["attack"] == "suite"
        assert entry["split"] == "train" and entry["round"] == r and entry["judge_draws"] == 2
        assert entry["calibration_holdout"] == 0.25
        assert entry["defense_files"] == load_pipelines(manifest)["ln-reject"].fingerprints()
        draw = train.metadata["threat"].get(f"{name}.r1")
        assert draw is None or (draw["judge_of"] == name and draw["split"] == "train")
        ids = read_table(table_dir, split="train", attacks=[name], columns=[]).sample_id
        # the seeded selection, outside the detector's calibration hold-out, less the samples the model gets
        # wrong when clean; the same samples every round
        assert SAMPLES * 0.9 < len(ids) <= SAMPLES and not holdout_mask(ids, 0.25, seed=0).any()
        assert not np.isin(ids, clean_wrong(table_dir)).any()
    one, two = (read_table(table_dir, split="train", attacks=[partition_name(round_prefix(r), "ln-reject", "suite",
                                                                             EPS)], columns=[]) for r in (1, 2))
    assert np.array_equal(np.sort(one.sample_id), np.sort(two.sample_id))


def test_each_refit_learns_from_the_rounds_before_it(world, fitted):
    root, _, start = world
    table_dir, fit = fitted
    first = partition_name(round_prefix(1), "ln-reject", "suite", EPS)
    r1, r2 = fit.rounds
    assert r1.fit_attacks == ["pgd", first]
    assert r2.fit_attacks == ["pgd", first, partition_name(round_prefix(2), "ln-reject", "suite", EPS)]
    files = [load_pipelines(m)["ln-reject"].fingerprints()["learned-noisy.npz"] for m in (start, r1.manifest,
                                                                                          r2.manifest)]
    assert len(set(files)) == 3  # every round's detector is a new one
    # the round-1 refit flags more of the round-1 rows that fooled the model than the starting detector did
    table = read_table(table_dir, split="train", attacks=["clean", first])
    clean, adv = table.select(attacks="clean"), table.select(attacks=first)
    label = dict(zip(clean.sample_id, clean.logits.argmax(1) == clean.labels))
    fooled = adv.take(np.flatnonzero([label[s] for s in adv.sample_id] & (adv.logits.argmax(1) != adv.labels)))
    assert len(fooled) >= 20
    old = load_pipelines(start)["ln-reject"].build().detector
    new = load_pipelines(r1.manifest)["ln-reject"].build().detector
    assert new.kind == old.kind and new.get_params() == old.get_params()  # the same detector, refitted
    before, after = old.flag_table(fooled), new.flag_table(fooled)
    assert after.mean() > before.mean() + 0.05, (before.mean(), after.mean())
    assert new.score_table(fooled).mean() > old.score_table(fooled).mean()
    # of the rows that got past the starting detector, the refit catches a share
    assert (~before).sum() >= 20 and after[~before].mean() >= 0.1, after[~before].mean()
    # The attacker re-attacks each refit, so its success need not drop: on this small setting it stays within a
    # few points (0.60 / 0.60 at 150 samples, 0.59 / 0.61 at 200), as on Fashion-MNIST (docs/threat-models.md).
    assert 0.3 < r1.success_rate < 1 and 0 < r2.success_rate < 1


def test_thresholds_keep_the_clean_fpr_near_its_target(fitted):
    _, fit = fitted
    for r in fit.rounds:
        (file, threshold), = r.threshold.items()
        assert file == "learned-noisy.npz" and np.isfinite(threshold)
        assert r.calibration_fpr[file] <= 0.011  # calibrated to 1% on the train hold-out's clean rows
        # 300 test clean rows never fitted on; a threshold set on ~150 clean rows at 1% is noisy (the starting
        # detector, fitted as fit-pipelines fits it, reads 4.3% there): near the target, and no drift upwards
        assert r.heldout_fpr[file] <= 0.08, r.heldout_fpr
        assert r.heldout_fpr[file] <= fit.start["heldout_fpr"][file] + 0.04, (r.heldout_fpr, fit.start)


def test_provenance_records_the_rounds_and_reaches_the_guard(world, fitted):
    _, _, start = world
    table_dir, fit = fitted
    prov = manifest_provenance(fit.manifest)
    assert prov["kind"] == "adversarial-fit" and prov["seed"] == 0 and prov["samples"] == SAMPLES
    assert prov["attacks"] == ["suite"] and prov["split"] == "train" and prov["stopped"]
    assert prov["start"]["manifest"] == str(start) and prov["fit_attacks"] == ["pgd"]
    assert [r["round"] for r in prov["rounds"]] == [1, 2]
    assert prov["rounds"][1]["partitions"] == [partition_name(round_prefix(2), "ln-reject", "suite", EPS)]
    assert prov["rounds"][0]["success_rate"] == pytest.approx(fit.rounds[0].success_rate)
    assert manifest_provenance(fit.rounds[0].manifest)["rounds"][0]["round"] == 1  # each manifest, its rounds
    json.dumps(prov)  # plain JSON
    guard, _, _ = package_pipeline(fit.manifest, "ln-reject", table_dir)
    assert guard.provenance["settings"]["manifest_provenance"]["rounds"] == prov["rounds"]
    text = format_rounds(fit)
    assert "round-1/defenses.json" in text and "stopped:" in text and len(text.splitlines()) == 5  # header, start, 2 rounds


def test_the_same_seed_gives_the_same_fit(world, fitted, digits_cnn, digits_sets, tmp_path):
    _, table_dir, manifest = world
    _, fit = fitted
    shutil.copytree(table_dir, tmp_path / "table")
    again = run_fit(digits_cnn, digits_sets[0], tmp_path / "table", manifest, tmp_path / "fit", rounds=1)
    a, b = fit.rounds[0], again.rounds[0]
    assert b.samples == a.samples and abs(b.success_rate - a.success_rate) <= 0.02
    assert b.threshold["learned-noisy.npz"] == pytest.approx(a.threshold["learned-noisy.npz"], rel=1e-3, abs=1e-3)


def test_a_used_workdir_and_unfittable_pipelines_are_refused(world, fitted, digits_cnn, digits_sets, tmp_path):
    from producers.errors import ProducerError

    _, table_dir, manifest = world
    _, fit = fitted
    with pytest.raises(ProducerError, match="holds an earlier fit"):
        run_fit(digits_cnn, digits_sets[0], table_dir, manifest, fit.manifest.parent.parent)
    with pytest.raises(ProducerError, match="no pipeline"):
        fit_adversarially(digits_cnn, digits_sets[0], table=table_dir, defenses=manifest, workdir=tmp_path / "w",
                          pipelines=["ln-agree"])
    bare = save_pipelines(tmp_path / "bare.json", {"none": {}})
    with pytest.raises(ProducerError, match="pipeline 'none' has no detector to refit"):
        fit_adversarially(digits_cnn, digits_sets[0], table=table_dir, defenses=bare, workdir=tmp_path / "w",
                          pipelines=["none"])
    with pytest.raises(ProducerError, match="train split"):
        fit_adversarially(digits_cnn, digits_sets[1], table=table_dir, defenses=manifest, workdir=tmp_path / "w")


def cli_args(tmp_path, manifest, out, *extra):
    return ["attack-defenses", "--dataset", "digits", "--model", str(tmp_path / "cnn"), "--defenses", str(manifest),
            "--pipelines", "ln-reject", "--attacks", "evade", "--judge-draws", "2", "--budgets", "0.15",
            "--param", "steps=3", "--out", str(out), *extra]


def test_attack_defenses_on_the_train_split(world, digits_cnn, tmp_path):
    from click.testing import CliRunner

    from producers.cli import main
    from producers.models.classifiers import save_model

    _, table_dir, manifest = world
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    save_model(digits_cnn, tmp_path / "cnn")
    result = CliRunner().invoke(main, cli_args(tmp_path, manifest, out, "--split", "train", "--train-samples", "60"))
    assert result.exit_code == 0, result.output
    name = "adaptive-train.ln-reject.evade.e38"
    train, test = read_table(out, split="train", columns=[]), read_table(out, split="test", columns=[])
    assert name in train.attacks and not any(a.startswith("adaptive") for a in test.attacks)
    entry = train.metadata["threat"][name]
    assert entry["split"] == "train" and entry["calibration_holdout"] == 0.25 and entry["target"] == "ln-reject"
    assert entry["defense_files"] == load_pipelines(manifest)["ln-reject"].fingerprints()
    ids = read_table(out, split="train", attacks=[name], columns=[]).sample_id
    assert 54 < len(ids) <= 60 and not holdout_mask(ids, 0.25, seed=0).any()  # the threshold's clean rows: never attacked
    assert not np.isin(ids, clean_wrong(out)).any()
    # the default split is unchanged: a test partition with the test entry of before (no split key)
    result = CliRunner().invoke(main, cli_args(tmp_path, manifest, out, "--test-samples", "20"))
    assert result.exit_code == 0, result.output
    entry = read_table(out, split="test", columns=[]).metadata["threat"]["adaptive.ln-reject.evade.e38"]
    assert "split" not in entry and "round" not in entry
    # more samples than the table's train split holds (600, a quarter of them held out): refused, clearly
    bad = CliRunner().invoke(main, cli_args(tmp_path, manifest, out, "--split", "train", "--train-samples", "500"))
    assert bad.exit_code == 1 and "have no clean row in" in bad.output, bad.output
    bad = CliRunner().invoke(main, cli_args(tmp_path, manifest, out, "--split", "train", "--test-samples", "5"))
    assert bad.exit_code == 1 and "Error: --test-samples does not apply with --split train" in bad.output
    bad = CliRunner().invoke(main, [*cli_args(tmp_path, manifest, out, "--split", "train"), "--tier", "query"])
    assert bad.exit_code == 1 and "--split train is for --tier adaptive" in bad.output, bad.output


def test_cli_fit_adversarially(world, digits_cnn, tmp_path):
    from click.testing import CliRunner

    from producers.cli import main
    from producers.models.classifiers import save_model

    _, table_dir, manifest = world
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    save_model(digits_cnn, tmp_path / "cnn")
    args = ["fit-adversarially", "--dataset", "digits", "--model", str(tmp_path / "cnn"), "--defenses", str(manifest),
            "--out", str(out), "--workdir", str(tmp_path / "fit"), "--rounds", "2", "--train-samples", "60",
            "--attacks", "suite", "--param", 'sequence=["apgd-ce"]', "--param", "steps=3", "--budgets", "0.15",
            "--judge-draws", "1", "--tolerance", "0.5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output[result.output.index("round  attacked"):].strip().splitlines()  # after the progress
    assert lines[0].split()[:4] == ["round", "attacked", "samples", "success"]
    assert lines[2].split()[:2] == ["1", "start/defenses.json"] and "learned-noisy.npz" in lines[2]
    assert lines[-1].startswith("stopped: round 2's success rate")  # a tolerance of 0.5 stops at round 2
    prov = manifest_provenance(tmp_path / "fit" / "round-2" / "defenses.json")
    assert prov["attack_params"] == {"sequence": ["apgd-ce"], "steps": 3} and prov["samples"] == 60
    assert 54 < read_table(out, split="train", attacks=["adaptive-round2.ln-reject.suite.e38"], columns=[]).sample_id.size <= 60
    again = CliRunner().invoke(main, [*args, "--json"])  # the workdir holds that fit now
    assert again.exit_code == 1 and "holds an earlier fit" in again.output
    fresh = [*args, "--json", "--rounds", "1", "--workdir", str(tmp_path / "fit2")]  # the last option wins
    again = CliRunner().invoke(main, fresh)
    assert again.exit_code == 0, again.output
    doc = json.loads(again.output)  # --json: no progress lines
    assert [r["round"] for r in doc["rounds"]] == [1] and doc["stopped"] == "ran all 1 round(s)"
    # round 1 of the first run already wrote its partition: the same attack on the same files is kept, not rerun
    assert doc["rounds"][0]["success_rate"] == pytest.approx(manifest_provenance(
        tmp_path / "fit" / "round-1" / "defenses.json")["rounds"][0]["success_rate"])
    bad = CliRunner().invoke(main, [*args[:-2], "--tolerance", "1.5"])
    assert bad.exit_code == 1 and "Error: --tolerance must be in [0, 1)" in bad.output
    bad = CliRunner().invoke(main, [*args, "--param", "eps=0.1"])
    assert bad.exit_code == 1 and "Error: --param eps: the budgets come from --budgets" in bad.output
