"""The `logitguard` CLI, driven through click's CliRunner."""

from __future__ import annotations

import json
import shutil

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from logitguard import LogitTable, read_table, write_table
from logitguard.cli import main
from producers.cli import main as produce_main


@pytest.fixture
def table_path(digits_table, tmp_path):
    path = tmp_path / "digits.parquet"
    write_table(digits_table, path)
    return path


def _commands(group: click.Group):
    return [(name, cmd) for name, cmd in group.commands.items()]


@pytest.mark.parametrize("group", [main, produce_main], ids=["logitguard", "logitguard-produce"])
def test_every_command_has_help_text(group):
    assert group.help
    for name, command in _commands(group):
        assert command.help, f"command {name!r} has no help text"
        result = CliRunner().invoke(group, [name, "--help"])
        assert result.exit_code == 0, result.output


def test_inspect_reports_what_the_logits_say(table_path, digits_arrays):
    result = CliRunner().invoke(main, ["inspect", str(table_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["num_rows"] == 2 * len(digits_arrays["labels"])
    assert summary["num_classes"] == 10 and summary["noise_queries"] == [3, 10]
    by_attack = {c["attack"]: c for c in summary["conditions"]}
    y = digits_arrays["labels"]
    clean_ok = digits_arrays["clean"].argmax(1) == y
    fgsm_ok = digits_arrays["fgsm"].argmax(1) == y
    assert by_attack["clean"]["accuracy"] == pytest.approx(clean_ok.mean())
    assert by_attack["fgsm"]["accuracy"] == pytest.approx(fgsm_ok.mean())
    assert by_attack["fgsm"]["attack_success_rate"] == pytest.approx((~fgsm_ok[clean_ok]).mean())
    assert by_attack["clean"]["attack_success_rate"] is None
    assert by_attack["fgsm"]["linf_mean"] == pytest.approx(np.float32(digits_arrays["linf"]).mean(), rel=1e-6)
    assert by_attack["fgsm"]["l2_median"] == pytest.approx(np.median(np.float32(digits_arrays["l2"])), rel=1e-6)
    # A real attack on a real model: it must have done something.
    assert by_attack["fgsm"]["accuracy"] < by_attack["clean"]["accuracy"] - 0.2
    assert summary["metadata"]["attacks"] == {"fgsm": {"eps": 0.15}}


def test_inspect_text_output(table_path, digits_arrays):
    result = CliRunner().invoke(main, ["inspect", str(table_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    n = len(digits_arrays["labels"])
    assert lines[0].startswith(f"rows: {2 * n}    classes: 10 (digit-0, digit-1,")
    assert lines[1] == "noise queries: K=3 x C=10"
    clean_acc = 100 * (digits_arrays["clean"].argmax(1) == digits_arrays["labels"]).mean()
    row = next(line for line in lines if line.startswith("test   clean"))
    assert row.split()[2:5] == ["-", str(n), f"{clean_acc:.1f}%"]  # clean rows have no threat model
    fgsm = next(line for line in lines if line.startswith("test   fgsm"))
    assert fgsm.split()[2:4] == ["oblivious", str(n)]  # no 'threat' metadata: an older table, oblivious
    assert "attack fgsm: eps=0.15" in lines


def test_inspect_errors_are_one_line_without_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tmp_path / "missing.parquet")])
    assert result.exit_code == 1
    assert result.output == f"Error: no such file or directory: {tmp_path / 'missing.parquet'}\n"
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sample_id": [0], "split": ["t"], "attack": ["clean"], "label": [0]}), bad)
    result = runner.invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 1
    assert result.output == "Error: missing required column(s) ['logits']\n"


def test_inspect_works_on_unlabelled_deployment_data(tmp_path):
    from logitguard import LogitTable

    table = LogitTable.from_arrays(logits=np.eye(3), sample_id=[0, 1, 2], split="deploy", attack="clean")
    write_table(table, tmp_path / "d.parquet")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "d.parquet"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["conditions"][0]["accuracy"] is None


# -- corrector commands ------------------------------------------------------------------------

FAST_ARGS = ["--hidden", "128", "--epochs", "30", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def corrector_path(digits_split_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("corrector") / "fgsm.pt"
    result = CliRunner().invoke(main, ["train-corrector", str(digits_split_dir), "--attacks", "fgsm",
                                       "--out", str(out), *FAST_ARGS, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["attacks"] == ["fgsm"] and report["epochs_run"] == 30 and len(report["history"]) == 30
    return out


def test_evaluate_reports_the_correction(digits_split_dir, corrector_path):
    result = CliRunner().invoke(main, ["evaluate", str(digits_split_dir), "--corrector", str(corrector_path),
                                       "--attacks", "fgsm", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["subset"], r["defense"]): r for r in json.loads(result.output)}
    assert rows[("full", "corrector")]["robust_accuracy"] > rows[("full", "none")]["robust_accuracy"] + 0.1
    text = CliRunner().invoke(main, ["evaluate", str(digits_split_dir), "--corrector", str(corrector_path)])
    assert text.exit_code == 0 and text.output.startswith("Full split\nattack")


def test_correct_writes_a_table_inspect_can_read(digits_split_dir, corrector_path, tmp_path):
    out = tmp_path / "corrected.parquet"
    args = ["correct", str(digits_split_dir), "--corrector", str(corrector_path), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["written"] == [str(out)]
    from logitguard import read_table
    from logitguard.defenses.corrector import LogitCorrector

    corrected = read_table(out)
    test = corrected.select(split="test", attacks="fgsm")
    expected = LogitCorrector.load(corrector_path).predict(
        read_table(digits_split_dir, split="test", attacks="fgsm").logits)
    np.testing.assert_array_equal(test.column("pred"), expected)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1
    assert again.output == (f"Error: refusing to overwrite existing file(s): {out}; "
                            "pass overwrite=True (--force)\n")
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0


def test_transfer_and_sweep_print_their_tables(digits_split_dir, tmp_path):
    result = CliRunner().invoke(main, ["transfer", str(digits_split_dir), "--attacks", "fgsm,bim", *FAST_ARGS,
                                       "--json"])
    assert result.exit_code == 0, result.output
    matrix = json.loads(result.output)
    assert set(matrix) == {"clean", "fgsm", "bim"} and set(matrix["bim"]) == {"fgsm", "bim"}
    # by default every attack with rows in both splits: a test-only partition (aimed at a defense) is left out
    table = read_table(digits_split_dir)
    extra = table.select(split="test", attacks="fgsm")
    extra = LogitTable.from_arrays(logits=extra.logits, sample_id=extra.sample_id, label=extra.labels, split="test",
                                   attack="adaptive.x.routes.e16", metadata=extra.metadata)
    both = tmp_path / "table"
    shutil.copytree(digits_split_dir, both)
    write_table(extra, tmp_path / "extra", partition_by=("split", "attack"))
    shutil.move(tmp_path / "extra" / "split=test" / "attack=adaptive.x.routes.e16", both / "split=test")
    result = CliRunner().invoke(main, ["transfer", str(both), *FAST_ARGS, "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)) == {"clean", *(a for a in table.attacks if a != "clean")}
    result = CliRunner().invoke(main, ["sweep-p-clean", str(digits_split_dir), "--attacks", "fgsm",
                                       "--values", "0,1", *FAST_ARGS])
    assert result.exit_code == 0, result.output
    assert result.output.split()[:3] == ["clean_accuracy", "robust_accuracy", "p_clean"]


@pytest.mark.parametrize("args, message", [
    (["train-corrector", "{table}", "--attacks", "pgd", "--out", "{tmp}/c.pt"],
     "Error: no rows for attack(s) ['pgd'] in this table; it has ['clean', 'bim', 'fgsm']"),
    (["train-corrector", "{table}", "--attacks", "fgsm", "--out", "{tmp}/c.pt", "--p-clean", "2"],
     "Error: p_clean must be in [0, 1], got 2.0\n"),
    (["evaluate", "{table}", "--corrector", "{tmp}/none.pt"], "Error: no such corrector file: {tmp}/none.pt\n"),
    (["evaluate", "{table}", "--corrector", "{table}/split=test/attack=clean/part-0.parquet"],
     "Error: {table}/split=test/attack=clean/part-0.parquet: not a logitguard corrector file"),
    (["sweep-p-clean", "{table}", "--attacks", "fgsm", "--values", "0,x"],
     "Error: Invalid value for --values: expected numbers, got 0,x\n"),
])
def test_corrector_command_errors_are_exact(digits_split_dir, tmp_path, args, message):
    fill = {"table": digits_split_dir, "tmp": tmp_path}
    result = CliRunner().invoke(main, [a.format(**fill) for a in args])
    assert result.exit_code != 0
    assert result.output.splitlines()[-1].startswith(message.format(**fill).rstrip("\n"))
    if message.endswith("\n"):
        assert result.output.endswith(message.format(**fill))


# -- detector commands -------------------------------------------------------------------------


def test_the_cli_lists_every_detector_kind():
    from logitguard.cli import main
    from logitguard.defenses.detectors import KINDS, Detector
    from logitguard.defenses.estimator import REGISTRY

    kind = next(p for p in main.commands["fit-detector"].params if p.name == "kind")
    assert tuple(kind.type.choices) == KINDS
    assert tuple(k for k, cls in REGISTRY.items() if issubclass(cls, Detector)) == KINDS


def test_fit_detector_detect_train_svm_and_defend(digits_split_dir, tmp_path):
    runner = CliRunner()
    table = str(digits_split_dir)
    detector, svm = tmp_path / "msp.npz", tmp_path / "svm.npz"
    result = runner.invoke(main, ["fit-detector", table, "--kind", "msp", "--out", str(detector), "--json"])
    assert result.exit_code == 0, result.output
    fitted = json.loads(result.output)
    assert fitted["kind"] == "msp" and 0 < fitted["achieved_fpr"] <= 0.05
    result = runner.invoke(main, ["detect", table, "--detector", str(detector), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["flagged_rate"]["fgsm"] > report["flagged_rate"]["clean"]
    assert {m["attack"] for m in report["metrics"]} == {"fgsm", "bim"}
    assert all(m["fpr_at_95_tpr_low"] <= m["fpr_at_95_tpr"] <= m["fpr_at_95_tpr_high"] for m in report["metrics"])
    assert runner.invoke(main, ["train-svm", table, "--out", str(svm)]).exit_code == 0
    out = tmp_path / "defended"
    args = ["defend", table, "--detector", str(detector), "--corrector", str(svm), "--out", str(out)]
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {(r["attack"], r["subset"], r["defense"]): r for r in report["evaluation"]}
    assert rows[("fgsm", "full", "gated")]["robust_accuracy"] > rows[("fgsm", "full", "none")]["robust_accuracy"]
    from logitguard import read_table

    defended = read_table(out)
    assert defended.column("flagged").mean() == pytest.approx(
        np.mean([report["flagged_rate"][a] for a in defended.attacks]), abs=0.1)
    again = runner.invoke(main, args)
    assert again.exit_code == 1 and "refusing to overwrite existing file(s)" in again.output


def test_detector_command_errors_are_exact(table_path, digits_split_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["fit-detector", str(digits_split_dir), "--kind", "lof", "--out", "x.npz"])
    assert result.exit_code == 2 and "Invalid value for '--kind': 'lof' is not one of 'msp'" in result.output
    result = runner.invoke(main, ["detect", str(digits_split_dir), "--detector", str(tmp_path / "none.npz")])
    assert result.output == f"Error: no such detector file: {tmp_path / 'none.npz'}\n"
    # digits_table (table_path) has only a test split: fitting on 'train' must say so.
    result = runner.invoke(main, ["fit-detector", str(table_path), "--kind", "msp", "--out", str(tmp_path / "d.npz")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {table_path}: no rows match split='train'")


# -- one spelling per option, every parameter exposed ---------------------------------------------


def _options(group: click.Group) -> dict[str, dict[str, click.Option]]:
    """Visible options of every command (nested groups too): command -> {--flag: option}."""
    out = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out.update({f"{name} {k}": v for k, v in _options(command).items()})
            continue
        out[name] = {flag: p for p in command.params if isinstance(p, click.Option) and not p.hidden
                     for flag in p.opts}
    return out


@pytest.mark.parametrize("group", [main, produce_main], ids=["logitguard", "logitguard-produce"])
def test_every_command_has_one_spelling_per_option(group):
    """--attacks / --budgets are the spellings (comma lists) everywhere; no command has hidden options."""
    for command, options in _options(group).items():
        assert "--attack" not in options and "--budget" not in options, command
    hidden = [(c.name, p.opts) for c in _leaf_commands(group) for p in c.params if getattr(p, "hidden", False)]
    assert hidden == []


def test_singular_spellings_are_refused(digits_split_dir, tmp_path):
    runner = CliRunner()
    table = str(digits_split_dir)
    result = runner.invoke(main, ["train-svm", table, "--attack", "bim", "--out", str(tmp_path / "svm.npz")])
    assert result.exit_code == 2 and "No such option '--attack'. Did you mean '--attacks'?" in result.output
    missing = runner.invoke(main, ["train-corrector", table, "--out", str(tmp_path / "c.npz")])
    assert missing.exit_code == 2 and "Missing option '--attacks'." in missing.output


@pytest.mark.parametrize("group, command", [(main, ["threat"]), (main, ["compare-models"]), (main, ["guard", "fit"]),
                                            (produce_main, ["attack-defenses"])])
def test_the_budgets_default_is_the_threat_vocabulary_s(group, command):
    """One copy of the default budgets: `DEFAULT_BUDGETS`, in its order, for every command that takes --budgets."""
    from logitguard.tables.threat import DEFAULT_BUDGETS, parse_budgets

    cmd = group
    for name in command:
        cmd = cmd.commands[name]
    (option,) = [p for p in cmd.params if p.name == "budgets"]
    default = option.get_default(click.Context(cmd))
    assert parse_budgets(default) == DEFAULT_BUDGETS and default == "8/255,16/255"
    help_text = CliRunner().invoke(group, [*command, "--help"]).output
    assert "[default: 8/255,16/255]" in " ".join(help_text.split())


def _leaf_commands(group):
    for command in group.commands.values():
        if isinstance(command, click.Group):
            yield from _leaf_commands(command)
        else:
            yield command


def test_fit_commands_expose_every_estimator_parameter():
    """Every constructor parameter is an option of its fit command (device/progress: runtime, not learned)."""
    from logitguard.cli.defenses import DETECTOR_OPTIONS
    from logitguard.defenses.corrector import LogitCorrector
    from logitguard.defenses.detectors import KINDS, make_detector
    from logitguard.defenses.svm import SVMCorrector

    options = _options(main)
    exposed = {name for _, name, _, _ in DETECTOR_OPTIONS} | {"fpr"}
    for kind in KINDS:
        assert set(make_detector(kind).get_params()) <= exposed, kind
    svm_flags = {"C": "--c", "gamma": "--gamma", "method": "--method", "landmarks": "--landmarks",
                 "max_rows": "--max-rows", "seed": "--seed"}
    assert set(SVMCorrector().get_params()) == set(svm_flags)
    assert set(svm_flags.values()) <= set(options["train-svm"])
    flags = {f"--{name.replace('_', '-')}" for name in LogitCorrector().get_params() if name != "progress"}
    for command in ("train-corrector", "transfer", "sweep-p-clean"):
        assert flags <= set(options[command]), command
    for command in ("correct", "evaluate", "explain"):  # load a corrector: torch may run it
        assert "--device" in options[command], command
    for command, params in _options(produce_main).items():
        assert "--device" in params, command  # every producer command runs a torch model


def test_fit_detector_takes_each_kinds_parameters_and_refuses_the_others(digits_split_dir, tmp_path):
    runner = CliRunner()
    table, out = str(digits_split_dir), tmp_path / "d.npz"
    result = runner.invoke(main, ["fit-detector", table, "--kind", "msp", "--correction", "logistic",
                                  "--out", str(out)])
    assert result.exit_code == 1 and result.output == "Error: --correction does not apply to --kind msp (it takes --fpr)\n"
    assert not out.exists()
    result = runner.invoke(main, ["fit-detector", table, "--kind", "learned", "--hidden", "8", "--max-iter", "30",
                                  "--seed", "3", "--c", "2", "--out", str(out)])
    assert result.exit_code == 1 and "Error: --c does not apply to --kind learned (it takes --fpr, --hidden, " \
                                      "--max-iter, --seed)" in result.output
    result = runner.invoke(main, ["fit-detector", table, "--kind", "learned", "--hidden", "8", "--max-iter", "30",
                                  "--seed", "3", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    from logitguard.defenses.detectors import load_detector

    detector = load_detector(out)
    assert detector.get_params() == {"fpr": 0.05, "hidden": 8, "max_iter": 30, "seed": 3}
    assert detector.w1_.shape[1] == 8
    result = runner.invoke(main, ["fit-detector", table, "--kind", "odds-single", "--thresholds", "pair",
                                  "--min-rows", "5", "--out", str(tmp_path / "o.npz")])
    assert result.exit_code == 0, result.output
    assert load_detector(tmp_path / "o.npz").get_params()["thresholds"] == "pair"


def test_train_svm_takes_gamma_and_seed(digits_split_dir, tmp_path):
    from logitguard.defenses.svm import SVMCorrector

    runner = CliRunner()
    out = tmp_path / "svm.npz"
    result = runner.invoke(main, ["train-svm", str(digits_split_dir), "--gamma", "0.5", "--seed", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    svm = SVMCorrector.load(out)
    assert (svm.gamma, svm.seed, svm.gamma_) == (0.5, 2, 0.5)
    bad = runner.invoke(main, ["train-svm", str(digits_split_dir), "--gamma", "wide", "--out", str(tmp_path / "b.npz")])
    assert bad.exit_code == 2 and "expected scale, auto or a number, got 'wide'" in bad.output


def test_demo_finds_its_default_table_from_any_directory(tmp_path, monkeypatch):
    import logitguard.cli.report as cli

    checkout = cli.Path(cli.__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)  # outside the repository: the relative default does not exist here
    if (checkout / cli.DEMO_DATA).exists():
        assert cli.default_demo_data() == checkout / cli.DEMO_DATA
    monkeypatch.setattr(cli, "DEMO_DATA", cli.Path("data") / "absent-table")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "report")])
    assert result.exit_code == 1
    assert result.output == (f"Error: no logit table at data/absent-table (the default) here or in {checkout}; "
                             "pass --data PATH (a table from `logitguard-produce export`)\n")
    assert not (tmp_path / "report").exists()
    (tmp_path / "data" / "absent-table").mkdir(parents=True)  # the current directory comes first
    assert cli.default_demo_data() == cli.Path("data") / "absent-table"
