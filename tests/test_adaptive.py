"""Adaptive attacks through the shipped pipelines, on digits with a small CNN.

One small world for the whole module: a digits table (clean and PGD rows with noise queries) exported
from the CNN, the shipped pipelines fitted on it, and every defense-aware attack run through every
pipeline at one budget. Settings are tiny (steps, samples) so the module runs in well under a minute.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from logitguard import read_table
from logitguard.defenses.pipelines import load_pipelines
from logitguard.defenses.shipped import fit_shipped
from logitguard.evaluation.threat import threat_model_table
from producers.attacks import make_attack
from producers.attacks.defended import routes_for
from producers.export.logits import export
from producers.data.noise import NoiseRecipe
from producers.threat.export import export_surrogate, export_through, partition_name
from producers.threat.pipeline import load_pipeline_mirror

EPS = 0.15
FAST = {"steps": 8, "alpha": 0.04}
RECIPE = NoiseRecipe.parse("gaussian:0.05,uniform:0.1", 4)


@pytest.fixture(scope="module")
def world(digits_cnn, digits_sets, tmp_path_factory):
    """(table dir, manifest, specs): digits logits under clean/PGD (+ noise), the shipped pipelines fitted on them."""
    root = tmp_path_factory.mktemp("adaptive")
    train, test = digits_sets
    export(digits_cnn, {"train": train, "test": test}, attacks=["clean", "pgd"], out=root / "table",
           samples={"train": 600, "test": 80}, attack_params={"pgd": {"eps": EPS, "alpha": 0.04, "steps": 8}},
           noise=RECIPE, progress=False)
    manifest = fit_shipped(read_table(root / "table", split="train"), root / "defenses", attacks=["pgd"])
    return root / "table", manifest, load_pipelines(manifest)


def test_routes_follow_the_policy(world):
    specs = world[2]
    got = {name: routes_for(load_pipeline_mirror(spec)) for name, spec in specs.items()}
    assert got == {"none": ("model",), "corrector": ("corrector",), "ln-corrector": ("evade", "flag", "both"),
                   "ln-odds": ("evade", "flag", "both"), "odds-odds": ("evade", "flag", "both"),
                   "ln-reject": ("evade",), "ln-agree": ("evade", "both")}


def test_defense_attacks_need_the_noise_recipe(world, digits_cnn):
    mirror = load_pipeline_mirror(world[2]["ln-reject"])
    with pytest.raises(ValueError, match="noise recipe"):
        make_attack("routes", digits_cnn, defense=mirror)


@pytest.mark.parametrize("name", ("defended-pgd", "evade", "routes", "min-margin"))  # the rest: test_strong_attacks
def test_attack_contract_through_a_gated_pipeline(name, world, digits_cnn, digits_sets):
    """Budget, pixel range, and the attack really breaks the pipeline (checked by the exact mirror)."""
    _, test = digits_sets
    mirror = load_pipeline_mirror(world[2]["ln-odds"])
    idx = np.arange(48)
    x, y = test.load(idx), torch.as_tensor(test.labels[idx])
    attack = make_attack(name, digits_cnn, defense=mirror, noise=RECIPE, eps=EPS, batch_size=32, **FAST)
    generator = torch.Generator().manual_seed(0)
    adv = attack(x, y, generator=generator)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= EPS + 1e-6
    before = attack.succeeded(x, y, generator, draws=4).float().mean()
    after = attack.succeeded(adv, y, generator, draws=1).float().mean()
    assert after > before + 0.3, (name, before, after)
    assert set(attack.params()) >= set(attack.param_names)


def test_evasion_beats_the_oblivious_attack_on_a_rejecting_pipeline(world, digits_cnn, digits_sets):
    """Against detect→reject, PGD that ignores the detector is mostly rejected; evasion gets through."""
    _, test = digits_sets
    mirror = load_pipeline_mirror(world[2]["ln-reject"])
    idx = np.arange(128)
    x, y = test.load(idx), torch.as_tensor(test.labels[idx])
    evade = make_attack("evade", digits_cnn, defense=mirror, noise=RECIPE, eps=EPS, steps=30, alpha=0.015,
                        batch_size=128)
    pgd = make_attack("pgd", digits_cnn, eps=EPS, steps=30, alpha=0.015, batch_size=128)
    adv_evade = evade(x, y, generator=torch.Generator().manual_seed(1))
    adv_pgd = pgd(x, y, generator=torch.Generator().manual_seed(1))
    judge = torch.Generator().manual_seed(2)
    through = evade.succeeded(adv_evade, y, judge, draws=2).float().mean()
    oblivious = evade.succeeded(adv_pgd, y, judge, draws=2).float().mean()
    model_fooled = (digits_cnn(adv_pgd).argmax(1) != y).float().mean()
    assert model_fooled > 0.6  # the oblivious attack does fool the model ...
    assert through > oblivious + 0.08, (through, oblivious)  # ... but only evasion also gets past the detector


def test_min_margin_shrinks_the_perturbation(world, digits_cnn, digits_sets):
    _, test = digits_sets
    mirror = load_pipeline_mirror(world[2]["corrector"])
    idx = np.arange(48)
    x, y = test.load(idx), torch.as_tensor(test.labels[idx])
    common = dict(defense=mirror, noise=RECIPE, eps=EPS, batch_size=48, **FAST)
    routes = make_attack("routes", digits_cnn, **common)(x, y, generator=torch.Generator().manual_seed(2))
    small = make_attack("min-margin", digits_cnn, **common)(x, y, generator=torch.Generator().manual_seed(2))
    size = lambda a: (a - x).flatten(1).norm(dim=1)  # noqa: E731
    moved = size(small) > 0
    assert moved.any()
    assert size(small)[moved].mean() < 0.8 * size(routes)[moved].mean()


def test_adaptive_accuracy_is_at_most_oblivious(world, digits_cnn, digits_sets, tmp_path):
    """Exported through every shipped pipeline and judged by the real (numpy) defenses: for every
    pipeline the adaptive attacks alone leave no more robust accuracy than the oblivious PGD."""
    table_dir, manifest, specs = world
    _, test = digits_sets
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    report = export_through(digits_cnn, test, specs, out=out, attacks=("routes", "defended-pgd"), budgets=(EPS,),
                            samples=80, noise=RECIPE, attack_params=FAST, batch_size=80, progress=False,
                            judge_draws=1)
    names = [partition_name("adaptive", p, a, EPS) for p in specs for a in ("routes", "defended-pgd")]
    assert sorted(p.parent.name for p in report.written) == sorted(f"attack={n}" for n in names)
    table = read_table(out, split="test")
    meta = table.metadata["threat"][partition_name("adaptive", "ln-odds", "routes", EPS)]
    assert meta["model"] == "adaptive" and meta["target"] == "ln-odds" and meta["eps"] == EPS
    assert set(meta["defense_files"]) == {"learned-noisy.npz", "odds-logistic.npz"}
    defenses = {name: spec.build() for name, spec in specs.items()}
    obl = threat_model_table(table.select(attacks=["clean", "pgd"]), defenses, budgets=(EPS,))
    adp = threat_model_table(table.select(attacks=["clean", *names]), defenses, budgets=(EPS,))
    o = obl[obl.threat_model == "oblivious"].set_index("pipeline").robust_accuracy
    a = adp[adp.threat_model == "adaptive"].set_index("pipeline").robust_accuracy
    for name in specs:
        assert a[name] <= o[name] + 1e-9, (name, a[name], o[name])
        if name != "none":  # aiming at the defense is worth it against every defense
            assert a[name] < o[name] - 0.05, (name, a[name], o[name])


def test_surrogate_attacks_through_an_own_copy_fitted_on_unused_samples(world, digits_cnn, digits_sets, tmp_path):
    table_dir, _, specs = world
    train, test = digits_sets
    defender_ids = read_table(table_dir, split="train", attacks=["clean"], columns=[]).sample_id
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    chosen = {name: specs[name] for name in ("ln-odds", "none")}
    report = export_surrogate(digits_cnn, train, test, chosen, out=out, workdir=tmp_path / "work",
                              defender_ids=defender_ids, attacker_samples=400, attacker_attacks=("clean", "pgd"),
                              attacker_params={"pgd": {"eps": EPS, "alpha": 0.04, "steps": 8}},
                              attacks=("routes",), budgets=(EPS,), samples=80, noise=RECIPE, attack_params=FAST,
                              batch_size=80, progress=False, judge_draws=1)
    name = partition_name("surrogate", "ln-odds", "routes", EPS)
    assert [p.parent.name for p in report.written] == [f"attack={name}"]  # the bare model has nothing to copy
    attacker = read_table(tmp_path / "work" / "attacker-table", attacks=["clean"], columns=[])
    assert len(attacker) == 400 and not np.isin(attacker.sample_id, defender_ids).any()
    threat = read_table(out, split="test").metadata["threat"][name]
    real = specs["ln-odds"].fingerprints()
    assert threat["model"] == "surrogate" and threat["target"] == "ln-odds"
    assert set(threat["defense_files"]) == set(real) and not set(threat["defense_files"].values()) & set(real.values())
    table = read_table(out, split="test", attacks=["clean", "pgd", name])
    results = threat_model_table(table, {"ln-odds": specs["ln-odds"].build()}, budgets=(EPS,))
    by = results.set_index(["pipeline", "threat_model"]).robust_accuracy
    assert by["ln-odds", "surrogate"] <= by["ln-odds", "oblivious"]


def test_cli_attack_defenses(world, digits_cnn, tmp_path):
    from click.testing import CliRunner

    from producers.cli import main
    from producers.models.classifiers import save_model

    table_dir, manifest, _ = world
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    save_model(digits_cnn, tmp_path / "cnn")
    args = ["attack-defenses", "--dataset", "digits", "--model", str(tmp_path / "cnn"), "--defenses", str(manifest),
            "--pipelines", "ln-reject", "--attacks", "evade", "--judge-draws", "1", "--budgets", "0.15", "--param", "steps=3",
            "--test-samples", "40", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote 1 file(s), skipped 0" in result.output
    table = read_table(out, split="test")
    assert partition_name("adaptive", "ln-reject", "evade", EPS) in table.attacks
    assert table.metadata["attacks"][partition_name("adaptive", "ln-reject", "evade", EPS)]["steps"] == 3
    again = CliRunner().invoke(main, args)
    assert "wrote 0 file(s), skipped 1" in again.output  # resumes: finished partitions are kept
    bad = CliRunner().invoke(main, [*args[:7], "--pipelines", "nope", *args[9:]])
    assert bad.exit_code == 1 and "Error: no pipeline(s) ['nope'] in" in bad.output
