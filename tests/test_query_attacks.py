"""The query threat model: attacks that only query a pipeline as deployed (square with scores, RayS with labels),
their query budget and counts, the query partitions' threat metadata, and the query tier in the threat table.

Real small data: the digits CNN, the shipped pipelines fitted on its logits (as tests/test_adaptive.py).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from logitguard import read_table
from logitguard.defenses.pipelines import load_pipelines
from logitguard.defenses.shipped import fit_shipped
from logitguard.evaluation.access import query_access_table
from logitguard.report.threat_text import format_query_access
from logitguard.evaluation.threat import threat_model_table
from logitguard.tables.threat import TIERS, tier_attacks
from producers.attacks import QUERY_ATTACK_NAMES, make_attack
from producers.data.noise import NoiseRecipe
from producers.export.logits import export
from producers.threat.export import partition_name
from producers.threat.pipeline import load_pipeline_mirror
from producers.threat.queries import export_queries

EPS = 0.15
RECIPE = NoiseRecipe.parse("gaussian:0.05,uniform:0.1", 4)


@pytest.fixture(scope="module")
def world(digits_cnn, digits_sets, tmp_path_factory):
    """(table dir, manifest, specs): digits logits under clean/PGD (+ noise), the shipped pipelines fitted on them."""
    root = tmp_path_factory.mktemp("query")
    train, test = digits_sets
    export(digits_cnn, {"train": train, "test": test}, attacks=["clean", "pgd"], out=root / "table",
           samples={"train": 600, "test": 40}, attack_params={"pgd": {"eps": EPS, "alpha": 0.04, "steps": 8}},
           noise=RECIPE, progress=False)
    manifest = fit_shipped(read_table(root / "table", split="train"), root / "defenses", attacks=["pgd"])
    return root / "table", manifest, load_pipelines(manifest)


def _batch(digits_sets, n=40):
    _, test = digits_sets
    idx = np.arange(n)
    return test.load(idx), torch.as_tensor(test.labels[idx])


def _run(name, world, digits_cnn, digits_sets, pipeline="none", queries=200, **params):
    x, y = _batch(digits_sets)
    mirror = load_pipeline_mirror(world[2][pipeline])
    attack = make_attack(name, digits_cnn, defense=mirror, noise=RECIPE, eps=EPS, queries=queries, batch_size=32,
                         **params)
    adv = attack(x, y, generator=torch.Generator().manual_seed(0))
    return attack, x, y, adv, attack.take_queries()


def test_square_with_scores_breaks_the_bare_model_within_budget(world, digits_cnn, digits_sets):
    attack, x, y, adv, used = _run("square", world, digits_cnn, digits_sets, queries=300)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= EPS + 1e-6
    generator = torch.Generator().manual_seed(1)
    before = attack.succeeded(x, y, generator).float().mean()
    after = attack.succeeded(adv, y, generator).float().mean()
    assert after > before + 0.4, (before, after)
    # a sample counted as broken is broken (the bare model has no noise: its answer is deterministic)
    assert torch.equal(attack.succeeded(adv, y, generator), torch.as_tensor(used > 0))
    assert attack.params()["returns"] == "scores" and attack.params()["queries"] == 300


def test_rays_with_labels_only_makes_progress_within_eps(world, digits_cnn, digits_sets):
    attack, x, y, adv, used = _run("rays", world, digits_cnn, digits_sets, queries=300)
    assert (adv - x).abs().amax(dim=(1, 2, 3)).max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    generator = torch.Generator().manual_seed(1)
    before = attack.succeeded(x, y, generator).float().mean()
    after = attack.succeeded(adv, y, generator).float().mean()
    assert after > before + 0.2, (before, after)
    assert torch.equal(attack.succeeded(adv, y, generator), torch.as_tensor(used > 0))
    # a sample it did not break is submitted clean
    assert torch.equal(adv[torch.as_tensor(used < 0)], x[torch.as_tensor(used < 0)])
    assert attack.params()["returns"] == "labels"


@pytest.mark.parametrize("name", QUERY_ATTACK_NAMES)
def test_query_counts_are_recorded_and_never_exceed_the_budget(name, world, digits_cnn, digits_sets):
    """Through a noise-reading rejecting pipeline, with a small budget: one count per sample, -1 or 1..budget;
    the clean image is the first query, so a sample the pipeline already gets wrong takes 1."""
    attack, x, y, adv, used = _run(name, world, digits_cnn, digits_sets, pipeline="ln-reject", queries=25)
    assert used.shape == (len(x),) and used.dtype == np.int64
    assert ((used == -1) | ((used >= 1) & (used <= 25))).all()
    assert (used != -1).any()
    assert not np.isin(used, [1, 2]).any()  # the pipeline draws noise: a wrong answer is asked 2 more times
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert attack.take_queries().size == 0  # taken once


def test_query_budget_is_validated(world, digits_cnn):
    mirror = load_pipeline_mirror(world[2]["none"])
    with pytest.raises(ValueError, match="queries must be an integer >= 2"):
        make_attack("square", digits_cnn, defense=mirror, queries=1)
    with pytest.raises(ValueError, match="noise recipe"):
        make_attack("rays", digits_cnn, defense=load_pipeline_mirror(world[2]["ln-reject"]))


def test_export_writes_query_partitions_that_the_query_and_adaptive_tiers_take(world, digits_cnn, digits_sets,
                                                                                tmp_path):
    table_dir, _, specs = world
    _, test = digits_sets
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    chosen = {name: specs[name] for name in ("none", "ln-reject")}
    kwargs = dict(out=out, attacks=QUERY_ATTACK_NAMES, budgets=(EPS,), samples=40, noise=RECIPE,
                  attack_params={"queries": 30}, batch_size=40, judge_draws=3, progress=False)
    report = export_queries(digits_cnn, test, chosen, **kwargs)
    names = [partition_name("query", p, a, EPS) for p in chosen for a in QUERY_ATTACK_NAMES]
    written = {p.parent.name.removeprefix("attack=") for p in report.written}
    assert set(names) <= written
    # judge draws: only through the noise-reading pipeline, named after their partition, without its results
    draws = written - set(names)
    assert draws and all(d.rsplit(".", 1)[0] in names and ".ln-reject." in d for d in draws)
    table = read_table(out, split="test")
    for draw in draws:
        entry = table.metadata["threat"][draw]
        assert entry["judge_of"] == draw.rsplit(".", 1)[0] and "queries" not in entry
    for name in names:
        entry = table.metadata["threat"][name]
        assert entry["model"] == "query" and entry["eps"] == EPS and entry["query_budget"] == 30
        assert entry["returns"] == ("scores" if ".square." in name else "labels")
        queries = np.asarray(entry["queries"])
        rows = table.select(attacks=[name])
        assert len(queries) == len(rows) == 40 and queries.max() <= 30
        broken = queries[queries > 0]
        assert entry["median_queries"] == (float(np.median(broken)) if len(broken) else None)
        # aligned with the rows sorted by sample_id: unbroken samples were submitted clean
        order = np.argsort(rows.sample_id)
        assert (rows.column("linf")[order][queries == -1] == 0).all()
    assert report.timings and all(t["rows"] == 40 for t in report.timings)
    again = export_queries(digits_cnn, test, chosen, **kwargs)  # results are not settings: it resumes
    assert not again.written and len(again.skipped) == 4

    attacks = list(table.attacks)
    tiers = tier_attacks(table.metadata, attacks, "ln-reject")
    own = sorted(n for n in names if ".ln-reject." in n)
    assert sorted(tiers["query"]) == sorted([*own, *draws])
    assert "query" not in tier_attacks(table.metadata, [a for a in attacks if a not in names and a not in draws],
                                       "ln-reject")
    defenses = {name: spec.build() for name, spec in chosen.items()}
    results = threat_model_table(table, defenses, budgets=(EPS,))
    got = results[results.pipeline == "ln-reject"].set_index("threat_model").robust_accuracy
    assert list(got.index) == [t for t in TIERS if t in got.index] and "query" in got.index
    # the bare model answers deterministically: its query figure is the share no query attack broke
    counts = np.array([table.metadata["threat"][partition_name("query", "none", a, EPS)]["queries"]
                       for a in QUERY_ATTACK_NAMES])
    bare = results[(results.pipeline == "none") & (results.threat_model == "query")].iloc[0]
    # over the samples the bare model gets right (a sample it gets wrong is broken at its first query)
    assert bare.robust_accuracy == pytest.approx((counts == -1).all(axis=0).sum() / bare.samples)
    # each query attack alone, by what it saw: the bare model's figures follow its recorded counts
    access = query_access_table(table, defenses, budgets=(EPS,))
    assert sorted(zip(access.pipeline, access.returns)) == [("ln-reject", "labels"), ("ln-reject", "scores"),
                                                            ("none", "labels"), ("none", "scores")]
    for attack, row in zip(QUERY_ATTACK_NAMES, (access[(access.pipeline == "none") & (access.attack == a)].iloc[0]
                                                for a in QUERY_ATTACK_NAMES)):
        recorded = np.asarray(table.metadata["threat"][partition_name("query", "none", attack, EPS)]["queries"])
        assert row.robust_accuracy == pytest.approx((recorded == -1).sum() / row.samples)
    assert (access.robust_accuracy_low <= access.robust_accuracy).all()
    assert "scores cost (points)" in format_query_access(access)


def test_tiers_put_query_between_transfer_and_oblivious():
    assert TIERS == ("transfer", "query", "oblivious", "surrogate", "adaptive")
    meta = {"threat": {"pgd": {"model": "oblivious"},
                       "query.p.square.e8": {"model": "query", "target": "p"},
                       "query.q.square.e8": {"model": "query", "target": "q"},
                       "adaptive.p.routes.e8": {"model": "adaptive", "target": "p"}}}
    tiers = tier_attacks(meta, list(meta["threat"]), "p")
    assert list(tiers) == ["query", "oblivious", "adaptive"]
    assert tiers["query"] == ["query.p.square.e8"]
    assert sorted(tiers["adaptive"]) == sorted(["pgd", "query.p.square.e8", "adaptive.p.routes.e8"])


def test_cli_attack_defenses_query_tier(world, digits_cnn, tmp_path):
    from click.testing import CliRunner

    from producers.cli import main
    from producers.models.classifiers import save_model

    table_dir, manifest, _ = world
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    save_model(digits_cnn, tmp_path / "cnn")
    args = ["attack-defenses", "--dataset", "digits", "--model", str(tmp_path / "cnn"), "--defenses", str(manifest),
            "--pipelines", "ln-reject", "--tier", "query", "--attacks", "square,rays", "--budgets", "0.15",
            "--param", "queries=20", "--test-samples", "20", "--judge-draws", "1", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote 2 file(s), skipped 0" in result.output
    table = read_table(out, split="test")
    name = partition_name("query", "ln-reject", "rays", EPS)
    assert table.metadata["threat"][name]["query_budget"] == 20 and len(table.metadata["threat"][name]["queries"]) == 20
    bad = CliRunner().invoke(main, [*args[:11], "--attacks", "routes", *args[13:]])
    assert bad.exit_code == 1
    assert "Error: --attacks takes query attacks ['square', 'rays'] with --tier query" in bad.output
