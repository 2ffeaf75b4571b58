"""Robustness curves: `logitguard-produce export --sweep` on a tiny digits CNN, then `logitguard curve`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitguard import read_table
from logitguard.cli import main as core
from logitguard.evaluation.curves import find_sweeps, measure_curves
from logitguard.defenses.guard import Guard
from logitguard.evaluation.guard import fit_guard
from logitguard.defenses.decision import ABSTAIN
from producers.cli import main as produce, parse_sweeps
from producers.errors import ProducerError
from producers.export.attack_specs import Sweep, expand_sweeps, sweep_alias

EPS = ("0.03", "0.1", "0.25")
PARTITIONS = ["pgd-eps-0.03", "pgd-eps-0.1", "pgd-eps-0.25"]


@pytest.fixture(scope="module")
def model_stem(digits_sets, tmp_path_factory):
    """A narrow SmallCNN trained on digits for a few seconds (about 80% test accuracy), saved."""
    from producers.models.classifiers import save_model, small_cnn_for, train_classifier

    torch.manual_seed(0)
    train, _ = digits_sets
    model = train_classifier(small_cnn_for(train, width=16), train, epochs=4, seed=0, progress=False)
    stem = tmp_path_factory.mktemp("curve-model") / "cnn"
    save_model(model, stem)
    return stem


def _export(stem, out, *extra):
    args = ["export", "--dataset", "digits", "--model", str(stem), "--sweep", f"pgd.eps={','.join(EPS)}",
            "--param", "pgd.steps=5", "--param", "pgd.alpha=0.06", "--train-samples", "120",
            "--test-samples", "80", "--noise-queries", "0", "--out", str(out), *extra]
    return CliRunner().invoke(produce, args)


@pytest.fixture(scope="module")
def swept(model_stem, tmp_path_factory):
    out = tmp_path_factory.mktemp("curve-table") / "table"
    result = _export(model_stem, out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def guard_file(swept, tmp_path_factory):
    path = tmp_path_factory.mktemp("curve-guard") / "guard.npz"
    fit_guard(swept, detector="learned", fpr=0.05).save(path)
    return path


def test_sweep_exports_one_partition_per_value_with_its_metadata(swept):
    table = read_table(swept)
    # --attacks defaults to clean with --sweep: the clean rows and the swept attack only.
    assert table.attacks == ["clean", *PARTITIONS] and table.splits == ["test", "train"]
    for text, name in zip(EPS, PARTITIONS):
        entry = table.metadata["attacks"][name]
        assert entry["sweep"] == {"name": "pgd.eps", "attack": "pgd", "param": "eps", "value": float(text)}
        assert entry["eps"] == float(text) and entry["steps"] == 5 and entry["alpha"] == 0.06
        assert table.metadata["threat"][name] == {"model": "oblivious", "attack": "pgd", "eps": float(text)}
        rows = table.select(attacks=name)
        assert rows.column("linf").max() <= float(text) + 1e-6
    test = table.select(split="test")
    accuracy = [float((t.logits.argmax(1) == t.labels).mean())
                for t in (test.select(attacks=a) for a in ["clean", *PARTITIONS])]
    assert all(a >= b for a, b in zip(accuracy, accuracy[1:])), accuracy  # the real tiny model: monotone
    assert accuracy[-1] < accuracy[0] - 0.3, accuracy


def test_curve_writes_json_and_png_with_the_right_points(swept, guard_file, tmp_path):
    out = tmp_path / "curve"
    result = CliRunner().invoke(core, ["curve", str(swept), "--defense", str(guard_file), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "curve.json").read_text())
    assert json.loads(result.stdout)["curves"] == doc["curves"]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [curve] = doc["curves"]
    assert (curve["sweep"], curve["threat_model"], curve["samples"]) == ("pgd.eps", "oblivious", 80)
    assert curve["threat"].startswith("oblivious")
    points = curve["points"]
    assert [p["partition"] for p in points] == ["clean", *PARTITIONS]
    assert [p["value"] for p in points] == [0, *map(float, EPS)]
    # Recompute every figure from the table and the guard's own decisions.
    table = read_table(swept, split="test")
    guard = Guard.load(guard_file)
    for point in points:
        rows = table.select(attacks=point["partition"])
        y = rows.labels
        label = guard.check_table(rows)["label"].to_numpy()
        flagged = guard.check_table(rows)["flagged"].to_numpy()
        model_right = rows.logits.argmax(1) == y
        assert point["accuracy"]["none"] == pytest.approx(model_right.mean())
        if point["partition"] == "clean":
            assert point["accuracy"]["guard"] == pytest.approx((label == y).mean())  # a rejection is an error
            assert point["detection_rate"]["guard"] == pytest.approx(flagged.mean())
            assert point["linf"] == 0
        else:
            assert point["accuracy"]["guard"] == pytest.approx(((label == y) | (label == ABSTAIN)).mean())
            clean = table.select(attacks="clean")
            assert np.array_equal(clean.sample_id, rows.sample_id)
            hit = (clean.logits.argmax(1) == y) & ~model_right
            assert point["detection_rate"]["guard"] == pytest.approx(flagged[hit].mean())
            assert 0 < point["linf"] <= point["value"] + 1e-6
            assert point["l2"] == pytest.approx(rows.column("l2").mean(), rel=1e-6)
    assert points[-1]["accuracy"]["none"] < points[0]["accuracy"]["none"]
    # A rejecting guard can only lose clean rows and only win attacked ones (rejected = defended).
    assert points[0]["accuracy"]["guard"] <= points[0]["accuracy"]["none"]
    assert all(p["accuracy"]["guard"] >= p["accuracy"]["none"] for p in points[1:])


def test_curve_with_a_manifest_pipeline_and_a_transfer_sweep(model_stem, swept, tmp_path, digits_sets):
    from logitguard.defenses.detectors import make_detector
    from logitguard.defenses.pipelines import load_pipelines, save_pipelines
    from producers.export.logits import export
    from producers.models.classifiers import load_model

    detector = make_detector("msp", fpr=0.1).fit_table(read_table(swept, split="train"))
    detector.save(tmp_path / "msp.npz")
    manifest = save_pipelines(tmp_path / "defenses.json", {"msp": {"detector": tmp_path / "msp.npz",
                                                                    "on_flag": "reject"}})
    # The saved model as its own substitute: transfer partitions, and the sweep found through them too.
    attacks, params, caps, sweeps = expand_sweeps(["clean"], {"pgd": {"steps": 3, "alpha": 0.1}}, {},
                                                  [Sweep("pgd", "eps", (("0.1", 0.1), ("0.3", 0.3)))])
    out = tmp_path / "transfer"
    export(load_model(model_stem), {"test": digits_sets[1]}, attacks=attacks, attack_params=params,
           attack_samples=caps, sweeps=sweeps, out=out, samples={"test": 40}, substitute=model_stem,
           progress=False)
    table = read_table(out)
    assert table.attacks == ["clean", "transfer-pgd-eps-0.1", "transfer-pgd-eps-0.3"]
    [found] = find_sweeps(table.metadata)
    assert (found.name, found.threat_model, found.values) == ("pgd.eps", "transfer", (0.1, 0.3))
    pipeline = load_pipelines(manifest)["msp"].build()
    result = measure_curves(table, {"msp": pipeline}, x="linf")
    [curve] = result["curves"]
    assert curve["threat_model"] == "transfer" and curve["threat"].startswith("transfer")
    assert [p["partition"] for p in curve["points"]] == ["clean", "transfer-pgd-eps-0.1", "transfer-pgd-eps-0.3"]
    assert result["defenses"]["msp"]["kind"] == "pipeline"
    # The CLI takes MANIFEST.json:NAME and MANIFEST.json alike.
    for spec in (f"{manifest}:msp", str(manifest)):
        target = tmp_path / f"c-{len(spec)}"
        done = CliRunner().invoke(core, ["curve", str(out), "--defense", spec, "--x", "l2", "--out", str(target)])
        assert done.exit_code == 0, done.output
        assert "pgd.eps (transfer" in done.output and "acc (msp)" in done.output
        assert json.loads((target / "curve.json").read_text())["curves"] == json.loads(
            json.dumps(measure_curves(table, {"msp": pipeline}, x="l2")["curves"]))


def test_curve_errors_are_clean(swept, digits_split_dir, guard_file, tmp_path, monkeypatch):
    runner = CliRunner()

    def run(*args):
        return runner.invoke(core, ["curve", *map(str, args)])

    result = run(digits_split_dir, "--out", tmp_path / "a")
    assert result.exit_code == 1 and result.output.startswith("Error: the table has no swept attack")
    result = run(swept, "--sweep", "pgd.steps", "--out", tmp_path / "a")
    assert result.exit_code == 1 and result.output.startswith("Error: no sweep pgd.steps in the table; it has pgd.eps")
    result = run(swept, "--defense", tmp_path / "nope.npz", "--out", tmp_path / "a")
    assert result.exit_code == 1 and "Error: --defense" in result.output and "no such guard file" in result.output
    result = run(swept, "--defense", f"{tmp_path / 'none.json'}:x", "--out", tmp_path / "a")
    assert result.exit_code == 1 and result.output.startswith("Error: no such pipeline manifest")
    result = run(swept, "--defense", guard_file, "--defense", guard_file, "--out", tmp_path / "a")
    assert result.exit_code == 1 and "the name 'guard' is given twice" in result.output
    assert not (tmp_path / "a").exists()
    # An existing output is refused without --force; with it, replaced. Without matplotlib: a note, no PNG.
    assert run(swept, "--out", tmp_path / "b").exit_code == 0
    result = run(swept, "--out", tmp_path / "b")
    assert result.exit_code == 1 and "refusing to overwrite" in result.output
    monkeypatch.setattr("logitguard.report.curves._have_matplotlib", lambda: False)
    (tmp_path / "b" / "curve.png").unlink()
    result = run(swept, "--out", tmp_path / "b", "--force")
    assert result.exit_code == 0, result.output
    assert "curve.png not drawn: matplotlib is missing" in result.output
    assert not (tmp_path / "b" / "curve.png").exists() and (tmp_path / "b" / "curve.json").is_file()


def test_sweep_option_parsing_and_errors(model_stem, tmp_path):
    [sweep] = parse_sweeps(["pgd.eps=2/255, 8/255"])
    assert (sweep.attack, sweep.param, [t for t, _ in sweep.values]) == ("pgd", "eps", ["2/255", "8/255"])
    assert sweep.values[1][1] == pytest.approx(8 / 255)
    assert sweep_alias("pgd", "eps", "2/255") == "pgd-eps-2of255"
    assert sweep_alias("art:SquareAttack", "eps", "0.05") == "art-squareattack-eps-0.05"
    # An alias in --attacks can be swept; its own parameters and cap go to every value.
    attacks, params, caps, entries = expand_sweeps(
        ["clean", "pgd", "l=pgd"], {"l": {"steps": 3}}, {"l": 10}, parse_sweeps(["l.steps=1,4"]))
    assert attacks == ["clean", "pgd", "l=pgd", "l-steps-1=pgd", "l-steps-4=pgd"]
    assert params == {"l": {"steps": 3}, "l-steps-1": {"steps": 1}, "l-steps-4": {"steps": 4}}
    assert caps == {"l": 10, "l-steps-1": 10, "l-steps-4": 10}
    assert entries["l-steps-4"] == {"name": "l.steps", "attack": "pgd", "param": "steps", "value": 4}
    for item, message in [("pgd.eps", "must look like ATTACK.NAME=V1,V2"), ("eps=0.1", "must look like"),
                          ("pgd.eps=0.1,big", "--sweep 'pgd.eps=0.1,big': cannot read 'big'")]:
        with pytest.raises(ProducerError, match=re.escape(message)):
            parse_sweeps([item])
    with pytest.raises(ProducerError, match=re.escape("--sweep pgd.eps repeats a value")):
        expand_sweeps(["clean"], {}, {}, parse_sweeps(["pgd.eps=0.5,1/2"]))
    with pytest.raises(ProducerError, match=re.escape("--param pgd.eps is not used: --sweep pgd.eps sets it")):
        expand_sweeps(["clean"], {"pgd": {"eps": 0.1}}, {}, parse_sweeps(["pgd.eps=0.2"]))
    # Out-of-range values and unknown parameters fail before the model is loaded.
    for sweep_item, message in [("pgd.eps=0.1,2", "attack pgd-eps-2 (pgd): eps must be a number in (0, 1], got 2"),
                                ("pgd.epss=0.1", "unknown parameter(s) ['epss']")]:
        result = CliRunner().invoke(produce, ["export", "--dataset", "digits", "--model", str(tmp_path / "missing"),
                                              "--sweep", sweep_item, "--out", str(tmp_path / "t")])
        assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output, \
            result.output


def test_curves_add_the_attacks_aimed_at_a_defense_labelled_with_their_tier(swept, tmp_path):
    """Partitions aimed at a defense (here two sweep points relabelled as adaptive attacks on `msp`) come back
    as that defense's per-sample worst case per tier at their budgets, beside the sweep, and are drawn."""
    from logitguard.defenses.detectors import make_detector
    from logitguard.defenses.gated import GatedDefense
    from logitguard.report.curves import format_curves, write_curves
    from logitguard.evaluation.threat import threat_model_table
    from logitguard.tables.table import LogitTable

    pipeline = GatedDefense(make_detector("msp", fpr=0.1).fit_table(read_table(swept, split="train")), None,
                            on_flag="reject")
    plain = read_table(swept, split="test")
    assert measure_curves(plain, {"msp": pipeline})["tiers"] == []  # nothing aimed at it: no tier points
    threat = {p: {"model": "adaptive", "target": "msp", "eps": float(e)} for p, e in zip(PARTITIONS[1:], EPS[1:])}
    table = LogitTable(plain.arrow, {**plain.metadata, "threat": threat})
    result = measure_curves(table, {"msp": pipeline}, sweeps=["pgd.eps"])
    tiers = {(t["pipeline"], t["threat_model"]): t["points"] for t in result["tiers"]}
    assert set(tiers) == {("msp", "adaptive"), ("none", "adaptive")}
    expected = threat_model_table(table, {"msp": pipeline}, budgets=(0.1, 0.25))
    expected = expected[(expected.pipeline == "msp") & (expected.threat_model == "adaptive")]
    assert [p["eps"] for p in tiers[("msp", "adaptive")]] == [0.1, 0.25]
    assert [p["robust_accuracy"] for p in tiers[("msp", "adaptive")]] == pytest.approx(
        expected.sort_values("eps").robust_accuracy.tolist())
    assert "Attacks aimed at the defenses" in format_curves(result)
    pytest.importorskip("matplotlib")
    written = write_curves(result, tmp_path / "c")
    assert written["plot"] is None and (tmp_path / "c" / "curve.png").read_bytes()[:4] == b"\x89PNG"
