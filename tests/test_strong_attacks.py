"""The strongest known detector-evasion attacks, the sequenced suite and the judge draws, on digits.

A small world as in test_adaptive: a digits CNN, a table of clean and PGD rows with noise queries, and
the shipped pipelines fitted on it. Attacks run a few steps on a few dozen images.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from logitguard import LogitTable, read_table, write_table
from logitguard.defenses.pipelines import load_pipelines
from logitguard.defenses.shipped import fit_shipped
from logitguard.evaluation.threat import threat_model_table
from producers.attacks import make_attack
from producers.attacks.apgd import checkpoints, defended_loss
from producers.data.noise import NoiseRecipe
from producers.errors import ProducerError
from producers.export.logits import export
from producers.export.plan import select_samples
from producers.threat.export import export_through, partition_name
from producers.threat.pipeline import load_pipeline_mirror

EPS = 0.15
RECIPE = NoiseRecipe.parse("gaussian:0.05,uniform:0.1", 4)
NEW = ("apgd-ce", "apgd-dlr", "apgd-t", "orthogonal-pgd", "selective-pgd", "lagrangian", "logit-match", "suite")


@pytest.fixture(scope="module")
def world(digits_cnn, digits_sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("strong")
    train, test = digits_sets
    export(digits_cnn, {"train": train, "test": test}, attacks=["clean", "pgd"], out=root / "table",
           samples={"train": 600, "test": 80}, attack_params={"pgd": {"eps": EPS, "alpha": 0.04, "steps": 8}},
           noise=RECIPE, progress=False)
    manifest = fit_shipped(read_table(root / "table", split="train"), root / "defenses", attacks=["pgd"])
    return root / "table", manifest, load_pipelines(manifest)


def _batch(test, n=48):
    idx = np.arange(n)
    return test.load(idx), torch.as_tensor(test.labels[idx])


@pytest.mark.parametrize("pipeline", ["ln-reject", "ln-agree"])
@pytest.mark.parametrize("name", NEW)
def test_attack_breaks_a_gated_pipeline_within_budget(name, pipeline, world, digits_cnn, digits_sets):
    x, y = _batch(digits_sets[1])
    attack = make_attack(name, digits_cnn, defense=load_pipeline_mirror(world[2][pipeline]), noise=RECIPE, eps=EPS,
                         steps=8, batch_size=48)
    generator = torch.Generator().manual_seed(0)
    adv = attack(x, y, generator=generator)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= EPS + 1e-6
    before = attack.succeeded(x, y, generator, draws=4).float().mean()
    after = attack.succeeded(adv, y, generator, draws=1).float().mean()
    assert after > before + 0.2, (name, before, after)  # robust accuracy falls well below clean
    wanted = {"eps", "sequence", "confirm_draws"} if name == "suite" else set(attack.param_names)
    assert set(attack.params()) >= wanted


@pytest.mark.parametrize("name", NEW[:-1])
def test_every_step_averages_eot_draws(name, world, digits_cnn, digits_sets, monkeypatch):
    """The gradient of every step comes from `eot` noise draws (the exact checks use `check_draws`)."""
    x, y = _batch(digits_sets[1], 8)
    attack = make_attack(name, digits_cnn, defense=load_pipeline_mirror(world[2]["ln-reject"]), noise=RECIPE,
                         eps=EPS, steps=3, eot=5, check_draws=2, batch_size=8)
    seen = []
    forward = attack._forward
    monkeypatch.setattr(attack, "_forward", lambda z, g, draws=1: (seen.append((draws, torch.is_grad_enabled())),
                                                                   forward(z, g, draws))[1])
    attack(x, y, generator=torch.Generator().manual_seed(0))
    with_grad = {d for d, grad in seen if grad}
    assert with_grad == {5}, (name, seen)


def test_suite_passes_shared_params_and_orders_by_default(world, digits_cnn):
    specs = world[2]
    suite = make_attack("suite", digits_cnn, defense=load_pipeline_mirror(specs["ln-reject"]), noise=RECIPE,
                        eps=EPS, eot=3, steps=5)
    assert suite.names == ["apgd-ce", "apgd-dlr", "lagrangian", "orthogonal-pgd", "selective-pgd", "apgd-t",
                           "logit-match", "routes"]
    assert all(a.eot == 3 and a.steps == 5 and a.eps == EPS for a in suite.attacks)
    bare = make_attack("suite", digits_cnn, defense=load_pipeline_mirror(specs["none"]), noise=RECIPE, eps=EPS)
    assert bare.names == ["apgd-ce", "apgd-dlr", "apgd-t", "routes"]  # nothing to evade, no noise to match
    own = make_attack("suite", digits_cnn, defense=load_pipeline_mirror(specs["none"]), noise=RECIPE, eps=EPS,
                      steps=5, sequence=["apgd-ce", ["apgd-t", {"targets": 2, "steps": 7}]])
    assert [a.steps for a in own.attacks] == [5, 7] and own.attacks[1].targets == 2


def test_suite_runs_later_attacks_on_survivors_only(world, digits_cnn, digits_sets):
    x, y = _batch(digits_sets[1])
    suite = make_attack("suite", digits_cnn, defense=load_pipeline_mirror(world[2]["ln-reject"]), noise=RECIPE,
                        eps=EPS, steps=6, sequence=["apgd-ce", "lagrangian", "routes"], batch_size=48)
    sizes = {i: [] for i in range(3)}
    for i, attack in enumerate(suite.attacks):
        perturb = attack.perturb
        attack.perturb = (lambda p, i: lambda xs, ys, g: (sizes[i].append(len(xs)), p(xs, ys, g))[1])(perturb, i)
    generator = torch.Generator().manual_seed(0)
    adv = suite(x, y, generator=generator)
    record = suite.record()
    ind = record["indicators"]
    broken_by = np.asarray(record["broken_by"])
    assert record["sequence"] == ["apgd-ce", "lagrangian", "routes"] and len(broken_by) == len(x)
    assert ind[0]["claimed"] > 0
    for i in range(3):
        assert [ind[i]["ran"]] == (sizes[i] or [0])
        assert (broken_by == i).sum() == ind[i]["claimed"]
    assert ind[1]["ran"] == ind[0]["ran"] - ind[0]["claimed"]
    assert ind[2]["ran"] == ind[1]["ran"] - ind[1]["claimed"]
    assert all(r["linf_ratio_median"] is None or 0 < r["linf_ratio_median"] <= 1 + 1e-6 for r in ind)
    moved = (adv - x).flatten(1).abs().amax(dim=1) > 0
    assert moved[torch.as_tensor(broken_by >= 0)].all()


def test_apgd_pieces():
    assert checkpoints(100) == {22, 41, 57, 70, 80, 87, 93, 99}  # p_j of Croce & Hein: 0.22, 0.41, 0.57, ...
    log_p = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]]).clamp(min=1e-300))
    y = torch.tensor([0, 1])
    ce = defended_loss(log_p, y, "ce")
    assert torch.allclose(ce, -torch.log(torch.tensor([0.5, 0.3])))  # abstain is not a wrong answer
    dlr = defended_loss(log_p, y, "dlr")
    assert dlr[0] > 0 and dlr[1] > 0  # row 1: the abstention (0.6) defends y
    assert defended_loss(log_p, y, "ce", torch.tensor([3, 3]))[0] == pytest.approx(-np.log(0.1))


def test_judge_draws_export_survivors_with_metadata(world, digits_cnn, digits_sets, tmp_path):
    table_dir, _, specs = world
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    chosen = {k: specs[k] for k in ("ln-reject", "corrector", "none")}
    report = export_through(digits_cnn, digits_sets[1], chosen, out=out, attacks=("suite",), budgets=(EPS,),
                            samples=40, noise=RECIPE, batch_size=40, progress=False, judge_draws=3,
                            attack_params={"steps": 4, "sequence": ["apgd-ce", "evade"]})
    parent = partition_name("adaptive", "ln-reject", "suite", EPS)
    other = partition_name("adaptive", "corrector", "suite", EPS)  # a corrector that reads no noise: one draw
    written = sorted(p.parent.name.removeprefix("attack=") for p in report.written)
    bare = partition_name("adaptive", "none", "suite", EPS)  # the bare model meets the suite too
    assert written == sorted([parent, f"{parent}.r1", f"{parent}.r2", other, bare])
    table = read_table(out, split="test")
    threat = table.metadata["threat"]
    assert threat[parent]["judge_draws"] == 3 and threat[parent]["sequence"] == ["apgd-ce", "evade"]
    assert "judge_draws" not in threat[other]
    # one entry per row (the 40 samples less those the model gets wrong when clean)
    assert len(threat[parent]["broken_by"]) == len(table.select(attacks=parent)) > 30
    assert {i["attack"] for i in threat[parent]["indicators"]} == {"apgd-ce", "evade"}
    assert all(i["judge_rejected"] <= i["claimed"] for i in threat[parent]["indicators"])
    judge = specs["ln-reject"].build()
    alive = None
    for k in range(3):
        name = parent if k == 0 else f"{parent}.r{k}"
        part = table.select(attacks=name)
        if k:
            entry = threat[name]
            assert entry["judge_draw"] == k and entry["judge_of"] == parent and entry["target"] == "ln-reject"
            assert "broken_by" not in entry
            assert table.metadata["attacks"][name] == table.metadata["attacks"][parent]
            assert np.array_equal(np.sort(part.sample_id), np.sort(alive))  # survivors of earlier draws only
            assert not np.allclose(part.noisy_logits, table.select(attacks=parent).take(
                np.isin(table.select(attacks=parent).sample_id, part.sample_id)).noisy_logits)  # fresh noise
        pred = judge.predict_table(part)
        survived = part.sample_id[(pred == part.labels) | (pred == -1)]
        alive = survived
    # the logits of a draw are the parent's (same images), within float tolerance
    p0 = table.select(attacks=parent)
    p1 = table.select(attacks=f"{parent}.r1")
    same = p0.take(np.isin(p0.sample_id, p1.sample_id))
    assert np.allclose(np.asarray(same.logits)[np.argsort(same.sample_id)],
                       np.asarray(p1.logits)[np.argsort(p1.sample_id)], atol=1e-5)


def test_a_continuation_attacks_only_what_earlier_partitions_left(world, digits_cnn, digits_sets, tmp_path):
    """after=["suite"]: a second attack runs on, and writes, only the samples the suite (and its judge draws) did
    not break; the threat entry names the partitions it continued, and the core still measures every sample."""
    table_dir, _, specs = world
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    chosen = {"ln-reject": specs["ln-reject"]}
    common = dict(out=out, budgets=(EPS,), samples=40, noise=RECIPE, batch_size=16, progress=False, judge_draws=2)
    export_through(digits_cnn, digits_sets[1], chosen, attacks=("suite",),
                   attack_params={"steps": 3, "sequence": ["apgd-ce"]}, **common)
    export_through(digits_cnn, digits_sets[1], chosen, attacks=("lagrangian",), after=["suite"],
                   attack_params={"steps": 3}, **common)
    table = read_table(out, split="test")
    parent = partition_name("adaptive", "ln-reject", "suite", EPS)
    judge = specs["ln-reject"].build()
    earlier = table.select(attacks=[parent, f"{parent}.r1"])
    pred = judge.predict_table(earlier)
    broken = np.unique(earlier.sample_id[(pred != earlier.labels) & (pred != -1)])
    name = partition_name("adaptive", "ln-reject", "lagrangian", EPS)
    part = table.select(attacks=name)
    assert table.metadata["threat"][name]["after"] == [parent]
    ids = np.sort(table.select(attacks=parent).sample_id)
    assert len(broken) and np.array_equal(np.sort(part.sample_id), ids[~np.isin(ids, broken)])
    assert (part.column("linf") > 0).any()
    # its judge draws hold only samples it attacked, and the core counts no gap for those it left out
    draw = table.select(attacks=f"{name}.r1")
    assert len(draw) and np.isin(draw.sample_id, part.sample_id).all()
    frame = threat_model_table(table, {"ln-reject": judge}, budgets=(EPS,))
    row = frame[(frame.pipeline == "ln-reject") & (frame.threat_model == "adaptive")].iloc[0]
    assert row.judge_gaps == 0 and name in row.attacks
    # the continuation's fewer rows do not shrink the samples measured
    without = table.select(attacks=[a for a in table.attacks if not a.startswith(name)])
    assert row.samples == threat_model_table(without, {"ln-reject": judge}, budgets=(EPS,)).samples.iloc[0]
    assert row.samples > len(part)


def test_only_samples_the_model_gets_right_when_clean_are_attacked(world, digits_cnn, digits_sets, tmp_path):
    """No robustness figure counts a sample the bare model gets wrong on its clean row, so a defense-aware
    export leaves such samples out (judged by the clean rows stored in the table)."""
    table_dir, _, specs = world
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    clean_file = next((out / "split=test").glob("attack=clean/*.parquet"))
    clean = read_table(clean_file.parent)
    ids = np.sort(select_samples(len(digits_sets[1]), 20, 0, "test"))  # the samples the export picks
    logits = np.array(clean.logits)
    flip = np.isin(clean.sample_id, ids[:3])  # the model now "gets" three of the first 20 samples wrong
    logits[flip] = np.roll(logits[flip], 1, axis=1)
    wrong = clean.sample_id[logits.argmax(axis=1) != clean.labels]
    assert np.isin(ids[:3], wrong).all()
    write_table(LogitTable.from_arrays(logits=logits, sample_id=clean.sample_id, label=clean.labels, split="test",
                                       attack="clean", noisy_logits=clean.noisy_logits, metadata=clean.metadata),
                clean_file, overwrite=True)
    export_through(digits_cnn, digits_sets[1], {"none": specs["none"]}, out=out, attacks=("suite",),
                   budgets=(EPS,), samples=20, noise=RECIPE, batch_size=20, progress=False,
                   attack_params={"steps": 2, "sequence": ["apgd-ce"]})
    part = read_table(out, split="test", attacks=[partition_name("adaptive", "none", "suite", EPS)], columns=[])
    assert np.array_equal(np.sort(part.sample_id), ids[~np.isin(ids, wrong)])

def test_a_focused_continuation_attacks_only_what_the_bare_model_lost(world, digits_cnn, digits_sets, tmp_path):
    """focus=("none", …, ["suite"]): only the samples the bare model's suite broke are attacked and written; the
    core counts no judge gap and still measures every sample."""
    table_dir, _, specs = world
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    common = dict(out=out, budgets=(EPS / 3,), samples=40, noise=RECIPE, batch_size=16, progress=False,
                  judge_draws=2)
    export_through(digits_cnn, digits_sets[1], {"none": specs["none"]}, attacks=("suite",),
                   attack_params={"steps": 2, "sequence": ["apgd-ce"]}, **common)
    export_through(digits_cnn, digits_sets[1], {"ln-reject": specs["ln-reject"]}, attacks=("lagrangian",),
                   focus=("none", specs["none"], ["suite"]), attack_params={"steps": 3}, **common)
    table = read_table(out, split="test")
    bare, name = (partition_name("adaptive", p, a, EPS / 3) for p, a in (("none", "suite"), ("ln-reject", "lagrangian")))
    rows = table.select(attacks=bare)
    lost = rows.sample_id[rows.logits.argmax(axis=1) != rows.labels]
    part = table.select(attacks=name)
    assert 0 < len(part) < len(rows) and np.array_equal(np.sort(part.sample_id), np.sort(lost))
    assert (part.column("linf") > 0).any()
    assert table.metadata["threat"][name]["focus"] == [bare]
    judge = specs["ln-reject"].build()
    draw = table.select(attacks=f"{name}.r1")
    assert np.isin(draw.sample_id, lost).all()
    frame = threat_model_table(table, {"ln-reject": judge}, budgets=(EPS / 3,))
    mine = frame[frame.pipeline == "ln-reject"]
    assert (mine.judge_gaps == 0).all() and (mine.samples > len(part)).all()
    # a continuation with no sample left to attack (the bare model's, after and focused on its own suite)
    report = export_through(digits_cnn, digits_sets[1], {"none": specs["none"]}, attacks=("apgd-ce",),
                            after=["suite"], focus=("none", specs["none"], ["suite"]), **common)
    assert report.settled == [partition_name("adaptive", "none", "apgd-ce", EPS / 3)] and not report.written


def test_an_alias_runs_an_attack_again_under_another_name(world, digits_cnn, digits_sets, tmp_path):
    """ALIAS=ATTACK: a second lagrangian with other parameters continues the first under its own partition
    name; the threat entry records the attack it ran."""
    table_dir, _, specs = world
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    chosen = {"ln-reject": specs["ln-reject"]}
    common = dict(out=out, budgets=(EPS,), samples=30, noise=RECIPE, batch_size=16, progress=False, judge_draws=1)
    export_through(digits_cnn, digits_sets[1], chosen, attacks=("lagrangian",), attack_params={"steps": 2}, **common)
    export_through(digits_cnn, digits_sets[1], chosen, attacks=("lagrangian-fool=lagrangian",), after=["lagrangian"],
                   attack_params={"steps": 2, "kappa": 2.0, "lambda_init": 0.01}, **common)
    table = read_table(out, split="test")
    first, second = (partition_name("adaptive", "ln-reject", a, EPS) for a in ("lagrangian", "lagrangian-fool"))
    assert {first, second} <= set(table.attacks)
    threat = table.metadata["threat"][second]
    assert threat["attack"] == "lagrangian" and threat["after"] == [first]
    assert table.metadata["attacks"][second]["kappa"] == 2.0
    with pytest.raises(ProducerError, match="unknown defense-aware attack"):
        export_through(digits_cnn, digits_sets[1], chosen, attacks=("x=nothing",), **common)


def test_a_targeted_lagrangian_aims_at_each_top_wrong_class_in_turn(world, digits_cnn, digits_sets, monkeypatch):
    """targets=2: the first runs push every unbroken sample towards its clean model's best wrong class, the next
    ones push the samples still unbroken towards the second best; the attack still breaks the pipeline."""
    x, y = _batch(digits_sets[1])
    attack = make_attack("lagrangian", digits_cnn, defense=load_pipeline_mirror(world[2]["ln-reject"]), noise=RECIPE,
                         eps=EPS, steps=8, restarts=1, targets=2, batch_size=48)
    aims = []
    state = attack._state
    monkeypatch.setattr(attack, "_state", lambda z, labels, g, target=None: (
        aims.append((attack._active_rows.clone(), target.clone())), state(z, labels, g, target))[1])
    generator = torch.Generator().manual_seed(0)
    adv = attack(x, y, generator=generator)
    with torch.no_grad():
        ranked = digits_cnn(x).scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
    runs = {}  # rows of a run -> its targets, in order; the 8 steps of one run share their rows
    for rows, target in aims:
        runs.setdefault(tuple(rows.tolist()), target)
    assert len(runs) == 2 and len(aims) == 2 * 8
    (first, t1), (second, t2) = ((torch.tensor(r), t) for r, t in runs.items())
    assert torch.equal(t1, ranked[first, 0]) and torch.equal(t2, ranked[second, 1])
    assert set(second.tolist()) < set(first.tolist())  # the second class is tried on what the first left
    assert attack.succeeded(adv, y, generator).float().mean() > attack.succeeded(x, y, generator, 4).float().mean() + 0.2
    assert attack.params()["targets"] == 2
    with pytest.raises(ValueError, match="targets"):
        make_attack("lagrangian", digits_cnn, defense=load_pipeline_mirror(world[2]["ln-reject"]), noise=RECIPE,
                    targets=-1)


def test_a_lagrangian_with_fallback_submits_its_nearest_miss(world, digits_cnn, digits_sets):
    """fallback: the same run (same draws), but a sample it never broke comes back at an iterate that fools the
    model (the detector then decides on fresh draws) instead of clean; the successes are unchanged."""
    x, y = _batch(digits_sets[1])
    mirror = load_pipeline_mirror(world[2]["ln-reject"])
    runs = {}
    for fallback in (False, True):
        attack = make_attack("lagrangian", digits_cnn, defense=mirror, noise=RECIPE, eps=EPS / 2, steps=4,
                             restarts=1, fallback=fallback, batch_size=48)
        runs[fallback] = attack(x, y, generator=torch.Generator().manual_seed(0))
    moved = {k: (adv - x).flatten(1).abs().amax(dim=1) > 0 for k, adv in runs.items()}
    assert torch.equal(runs[True][moved[False]], runs[False][moved[False]])
    near = moved[True] & ~moved[False]
    assert near.any() and (digits_cnn(runs[True][near]).argmax(dim=1) != y[near]).all()
    assert ((runs[True] - x).abs().amax() <= EPS / 2 + 1e-6) and attack.params()["fallback"] is True


def test_cli_suite_with_judge_draws(world, digits_cnn, tmp_path):
    from click.testing import CliRunner

    from producers.cli import main
    from producers.models.classifiers import save_model

    table_dir, manifest, _ = world
    out = tmp_path / "table"
    shutil.copytree(table_dir, out)
    save_model(digits_cnn, tmp_path / "cnn")
    args = ["attack-defenses", "--dataset", "digits", "--model", str(tmp_path / "cnn"), "--defenses", str(manifest),
            "--pipelines", "ln-reject", "--attacks", "suite", "--judge-draws", "2", "--budgets", "0.15",
            "--param", "steps=2", "--param", 'sequence=["apgd-ce"]', "--test-samples", "30", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    name = partition_name("adaptive", "ln-reject", "suite", EPS)
    table = read_table(out, split="test")
    assert name in table.attacks and table.metadata["threat"][name]["judge_draws"] == 2
    assert table.metadata["attacks"][name]["sequence"][0]["attack"] == "apgd-ce"
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "wrote 0 file(s)" in again.output  # resumes despite the recorded results
    for focus, error in (("nothing:suite", "no pipeline 'nothing'"), ("none", "PIPELINE:ATTACKS")):
        refused = CliRunner().invoke(main, [*args, "--focus", focus])
        assert refused.exit_code != 0 and error in refused.output, refused.output


@pytest.mark.parametrize("name", ["orthogonal-pgd", "selective-pgd"])
def test_orthogonal_step_is_orthogonal_to_the_other_gradient(name, world, digits_cnn, digits_sets):
    """Orthogonal PGD removes the other objective's gradient from the one it follows; Selective does not."""
    x, y = _batch(digits_sets[1], 16)
    attack = make_attack(name, digits_cnn, defense=load_pipeline_mirror(world[2]["ln-reject"]), noise=RECIPE, eps=EPS)
    attack._score_scale = attack._score_scale_on(x, None)
    z = x.clone().requires_grad_(True)
    direction, _ = attack._step_direction("evade", None, z, y, torch.Generator().manual_seed(0))
    s = attack._state(z, y, torch.Generator().manual_seed(0))  # the same noise draws
    g_class = torch.autograd.grad(s.model_margin.sum(), z, retain_graph=True)[0].flatten(1)
    g_detect = torch.autograd.grad(s.flag_excess.sum(), z)[0].flatten(1)
    right = (s.model_margin > -attack.kappa)[:, None]
    follow, other = torch.where(right, g_class, g_detect), torch.where(right, g_detect, g_class)
    cos = torch.nn.functional.cosine_similarity(direction.flatten(1), other, dim=1)
    if name == "orthogonal-pgd":
        assert cos.abs().max() < 1e-3
        assert (torch.nn.functional.cosine_similarity(direction.flatten(1), follow, dim=1) > 0).all()
    else:
        assert torch.allclose(direction.flatten(1), follow, atol=1e-6)
