"""The `logitguard-produce` command: train a classifier, export clean/adversarial logit tables."""

from __future__ import annotations

import json
import time
from fractions import Fraction
from functools import partial
from typing import TYPE_CHECKING, Any

import click

from logitguard.cli import ErrorReportingGroup, claim_output, echo_json, emit, engine_option, json_option, on_ray
from logitguard.report.summary import render_table

from .errors import ProducerError

if TYPE_CHECKING:
    from .export.logits import Sweep


@click.group(cls=ErrorReportingGroup)
@click.version_option(package_name="logitguard")
def main() -> None:
    """Train classifiers, run attacks and export clean/adversarial logit tables."""
    _require_torch()


def _require_torch() -> None:
    """Every producer command runs a torch model: refuse early, and say how to install it, without torch."""
    import importlib.util

    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken or blocked torch
        found = False
    if not found:
        raise ProducerError("logitguard-produce needs torch, which is not installed: "
                            "pip install 'logitguard[train,vision]' (the logitguard core does not)")


def dataset_options(func):
    func = click.option("--root", type=click.Path(file_okay=False), default=None,
                        help="Directory with the dataset's files (fashion-mnist: the IDX files; "
                             "mnist, imagefolder: required).")(func)
    return click.option("--dataset", required=True, help="digits, fashion-mnist, mnist or imagefolder.")(func)


def device_options(func):
    func = click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, …")(func)
    func = click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random choice.")(func)
    return click.option("--batch-size", type=int, default=256, show_default=True)(func)


@main.command()
@dataset_options
@device_options
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--width", type=int, default=32, show_default=True,
              help="SmallCNN width w (conv w, conv 2w); a transfer substitute can differ from the target.")
@click.option("--objective", default="ce", show_default=True,
              help="ce, rce (reverse cross-entropy; the model predicts from the negated logits), pgd-at (PGD "
                   "adversarial training), alp (adversarial logit pairing) or at-alp (attention + logit pairing).")
@click.option("--activation", default="relu", show_default=True,
              help="relu, or jumprelu[:k][:random]: JumpReLU with jump k (default 0.0645) at inference; "
                   ":random draws k' ~ U(0, 2k) per forward.")
@click.option("--train-samples", type=int, default=None,
              help="Train on a seeded subset of N images (the one `export --train-samples N` picks).")
@click.option("--at-eps", default="16/255", show_default=True,
              help="Adversarial objectives: L-inf budget of the training PGD (pixels in [0, 1]; 8/255 or 0.03).")
@click.option("--at-steps", type=int, default=7, show_default=True, help="Adversarial objectives: PGD steps.")
@click.option("--at-alpha", default=None, help="Adversarial objectives: PGD step size  [default: 2.5*eps/steps]")
@click.option("--alp-lambda", type=float, default=0.5, show_default=True,
              help="alp, at-alp: weight of the logit pairing ||Z(x) - Z(x_adv)||^2.")
@click.option("--attention-beta", type=float, default=2.0, show_default=True,
              help="at-alp: beta, the attention pairing term is beta/2 * sum over conv blocks of ||Q(x) - Q(x_adv)||_2.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Path stem: writes OUT.pt (weights) and OUT.json (config).")
@click.option("--force", is_flag=True, help="Overwrite existing model files.")
@json_option
def train(dataset: str, root: str | None, batch_size: int, seed: int, device: str, epochs: int, lr: float,
          width: int, objective: str, activation: str, train_samples: int | None, at_eps: str, at_steps: int,
          at_alpha: str | None, alp_lambda: float, attention_beta: float, out: str, force: bool,
          as_json: bool) -> None:
    """Train the small CNN on a dataset's train split and save it (weights + JSON config, no pickle).

    For a transfer substitute, train another with a different --seed (and --width). --objective picks
    the loss (docs/producers.md, "Training objectives"); --activation jumprelu retrofits JumpReLU.
    """
    from pathlib import Path

    import torch

    from .data.datasets import load_dataset
    from .models.classifiers import accuracy, parse_activation, save_model, small_cnn_for
    from .models.training import make_objective, objective_record, train_model, training_subset

    _positive(epochs=epochs, width=width, batch_size=batch_size, train_samples=train_samples)
    if not lr > 0:
        raise ProducerError(f"--lr must be positive, got {lr}")
    goal = make_objective(objective, eps=_fraction(at_eps, "--at-eps"), steps=at_steps,
                          alpha=None if at_alpha is None else _fraction(at_alpha, "--at-alpha"),
                          logit_weight=alp_lambda, attention_weight=attention_beta)
    act = parse_activation(activation)
    # Before training: both files writable, not being written by another run, not overwritten without --force.
    claim_output(str(Path(out).with_suffix(".pt")), force, directory=False, extra=(str(Path(out).with_suffix(".json")),))
    train_set, test_set = (load_dataset(dataset, s, root=root) for s in ("train", "test"))
    started = time.perf_counter()
    torch.manual_seed(seed)  # the initial weights too depend on --seed (a transfer substitute differs by it)
    model = small_cnn_for(train_set, width=width, activation=act, **goal.model_config())
    train_set = training_subset(train_set, train_samples, seed)
    model.config["train"] = objective_record(goal, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                             samples=len(train_set))
    train_model(model, train_set, goal, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    model.config["train_seconds"] = round(time.perf_counter() - started, 1)
    model.config["test_accuracy"] = accuracy(model, test_set, device=device)
    weights, config = save_model(model.cpu(), out, overwrite=force)
    result = {"weights": str(weights), "config": str(config), "test_accuracy": model.config["test_accuracy"],
              "train_seconds": model.config["train_seconds"], "objective": goal.name, "samples": len(train_set)}
    emit(result, as_json, f"test accuracy {100 * result['test_accuracy']:.2f}% after {epochs} epochs of "
                          f"{goal.name} on {len(train_set)} images ({result['train_seconds']} s); "
                          f"wrote {weights} and {config}")


def _fraction(raw: str, option: str) -> float:
    """``"16/255"`` or ``"0.06"`` → float; ProducerError naming `option` otherwise."""
    try:
        return float(Fraction(raw.strip()))
    except (ValueError, ZeroDivisionError):
        raise ProducerError(f"{option} must be a number or a fraction such as 16/255, got {raw!r}") from None


@main.command()
@dataset_options
@click.option("--model", "model_spec", required=True, help="Path stem of a saved small CNN (from `train`).")
@click.option("--activation", required=True, help="relu or jumprelu[:k][:random] (e.g. jumprelu:0.0645).")
@click.option("--device", default="cpu", show_default=True, help="For measuring the test accuracy.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Path stem for the new model.")
@click.option("--force", is_flag=True, help="Overwrite existing model files.")
@json_option
def retrofit(dataset: str, root: str | None, model_spec: str, activation: str, device: str, out: str, force: bool,
             as_json: bool) -> None:
    """A saved model's weights with another activation, e.g. JumpReLU (seed 003: a retrofit, no training).

    The activation has no weights, so the state dict is reused as it is; the new model's JSON records where
    it came from and its own test accuracy.
    """
    from pathlib import Path

    from .data.datasets import load_dataset
    from .models.classifiers import accuracy, build_model, load_model, parse_activation, save_model

    entry = parse_activation(activation)
    claim_output(str(Path(out).with_suffix(".pt")), force, directory=False, extra=(str(Path(out).with_suffix(".json")),))
    source = load_model(model_spec)
    if source.config.get("arch") != "small-cnn":
        raise ProducerError(f"retrofit applies to the small CNN; {model_spec} is a {source.config.get('arch')!r}")
    config = {k: v for k, v in source.config.items() if k not in ("test_accuracy",)}
    model = build_model({**config, "activation": entry, "retrofit": {"from": model_spec, "activation": entry}})
    model.load_state_dict(source.state_dict())
    model.config["test_accuracy"] = accuracy(model.to(device).eval(), load_dataset(dataset, "test", root=root),
                                             device=device)
    weights, config_path = save_model(model.cpu(), out, overwrite=force)
    result = {"weights": str(weights), "config": str(config_path), "test_accuracy": model.config["test_accuracy"],
              "source_test_accuracy": source.config.get("test_accuracy")}
    emit(result, as_json, f"test accuracy {100 * result['test_accuracy']:.2f}% with {activation} (was "
                          f"{100 * (result['source_test_accuracy'] or float('nan')):.2f}%); wrote {weights} and "
                          f"{config_path}")


def _positive(**values: int | None) -> None:
    """ProducerError naming the option when a count is below 1 (None: not given)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ProducerError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


@main.command()
@dataset_options
@device_options
@click.option("--model", "model_spec", required=True,
              help="Path stem of a model saved by `train`, or resnet50 / vgg16 / densenet121.")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Local torchvision state dict for a zoo model (never downloaded).")
@click.option("--attacks", default="clean,fgsm,bim,pgd,mim,deepfool,cw", show_default=True,
              help="Comma-separated: clean, fgsm, bim, pgd, mim, deepfool, cw, art:<ClassName>, or "
                   "ALIAS=ATTACK (e.g. pgd-eps8=pgd) to run an attack again under another name.")
@click.option("--param", "params", multiple=True, metavar="ATTACK.NAME=VALUE",
              help="Override an attack parameter, e.g. pgd.eps=8/255, cw.steps=50 or pgd-eps8.eps=8/255 "
                   "(an alias; repeatable).")
@click.option("--sweep", "sweeps", multiple=True, metavar="ATTACK.NAME=V1,V2,…",
              help="Run ATTACK once per value of one parameter, e.g. pgd.eps=2/255,4/255,8/255: partitions "
                   "pgd-eps-2of255, … with the sweep in their metadata (for `logitguard curve`; repeatable). "
                   "With --sweep, --attacks defaults to clean.")
@click.option("--train-samples", type=int, default=None, help="Train samples to select (default: all).")
@click.option("--test-samples", type=int, default=None, help="Test samples to select (default: all).")
@click.option("--max-samples", "caps", default="", metavar="ATTACK=N,…",
              help="Fewer samples per split for costly attacks, e.g. deepfool=2000,cw=2000.")
@click.option("--noise-queries", type=int, default=8, show_default=True,
              help="K noisy copies of each input for the odds test (0: none).")
@click.option("--noise", default=None, help="Noise recipe KIND:SCALE,… cycled over the K queries "
              "(kinds: gaussian, uniform, sign; pixels in [0, 1]).  [default: "
              "gaussian:0.05,gaussian:0.1,uniform:0.1,sign:0.05]")
@click.option("--features/--no-features", default=False, show_default=True,
              help="Also store penultimate-layer features.")
@click.option("--insen/--no-insen", default=False, show_default=True,
              help="Also store the 5 input-sensitivity statistics of each stored input (column insen).")
@click.option("--external", default=None, metavar="gred:STEM",
              help="Also store a saved GRED's verdict on each stored input (external_score, external_label).")
@click.option("--shard", default="0/1", show_default=True, help="Export only slice I of N (I/N).")
@click.option("--splits", default="train,test", show_default=True,
              help="Comma-separated splits to export (e.g. test, to add partitions to the test split only).")
@click.option("--substitute", default=None, metavar="STEM",
              help="Transfer attacks: compute every attack through this saved model (from `train`) and export "
                   "the --model's logits on those images, as partitions transfer-<attack>.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output table directory.")
@engine_option
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1, show_default=True,
              help="With --engine ray on CPUs: CPUs (and torch threads) per actor.")
@json_option
def export(dataset: str, root: str | None, batch_size: int, seed: int, device: str, model_spec: str,
           weights: str | None, attacks: str, params: tuple[str, ...], sweeps: tuple[str, ...],
           train_samples: int | None,
           test_samples: int | None, caps: str, noise_queries: int, noise: str | None, features: bool,
           insen: bool, external: str | None, shard: str, splits: str, substitute: str | None, out: str, engine: str, workers: int | None,
           cpus_per_worker: float, as_json: bool) -> None:
    """Run attacks on a dataset and write clean/adversarial logits as a partitioned table.

    Finished partitions (split x attack x shard) are skipped, so a rerun resumes an interrupted export.
    With --engine ray, N actors (--workers; one per GPU with --device cuda) run shards 0/N … N-1/N at once
    and their partitions are added to --out together (docs/scale.md).
    """
    from logitguard.files import check_writable

    from .data.datasets import load_dataset
    from .export.logits import Shard, expand_sweeps, export as run_export, plan_attacks
    from .models.classifiers import resolve_model
    from .data.noise import DEFAULT_NOISE, NoiseRecipe

    # Everything that needs neither data nor model is checked first.
    _positive(train_samples=train_samples, test_samples=test_samples, batch_size=batch_size)
    if noise_queries < 0:
        raise ProducerError(f"--noise-queries must be 0 (none) or more, got {noise_queries}")
    if sweeps and click.get_current_context().get_parameter_source("attacks").name == "DEFAULT":
        attacks = "clean"  # a sweep's table: the clean rows and the swept attack only
    attack_names = [a.strip() for a in attacks.split(",") if a.strip()]
    attack_params, attack_samples = parse_params(params), _sample_caps(caps)
    attack_names, attack_params, attack_samples, sweep_entries = expand_sweeps(
        attack_names, attack_params, attack_samples, parse_sweeps(sweeps))
    plan_attacks(attack_names, attack_params, attack_samples)
    shard_spec = Shard.parse(shard)
    if external is not None:
        from .models.gred import parse_external

        parse_external(external)
    if engine == "ray" and shard_spec != Shard():
        raise ProducerError("--shard is for single-process runs; --engine ray runs every shard of --workers N")
    chosen_splits = _splits(splits)
    recipe = NoiseRecipe.parse(noise or DEFAULT_NOISE, noise_queries) if noise_queries > 0 else None
    check_writable(out, directory=True, error=ProducerError)  # partitions are staged beside --out
    scale = on_ray(engine, workers, "producers.export.scale")
    model = resolve_model(model_spec, weights=weights, device="cpu" if scale else device)
    options = dict(
        attacks=attack_names, samples={"train": train_samples, "test": test_samples},
        attack_samples=attack_samples, attack_params=attack_params, noise=recipe, features=features, insen=insen,
        external=external, seed=seed, batch_size=batch_size, substitute=substitute, sweeps=sweep_entries,
        metadata={"dataset": {"name": dataset}, "model": _model_metadata(model, model_spec)},
    )
    if scale:  # each actor loads the dataset as this process would
        report = scale.export_ray(model, partial(scale.load_splits, dataset, chosen_splits, root), out=out,
                                  workers=workers, device=device, cpus_per_worker=cpus_per_worker, **options)
    else:
        data = {s: load_dataset(dataset, s, root=root) for s in chosen_splits}
        report = run_export(model, data, out=out, shard=shard_spec, device=device, **options)
    _echo_report(report, out, as_json)


@main.command()
@dataset_options
@device_options
@click.option("--model", "model_spec", required=True, help="Path stem of the model GRED protects (from `train`).")
@click.option("--train-samples", type=int, default=2000, show_default=True,
              help="Training images (a seeded choice); each gets a PGD twin, so the networks see twice as many.")
@click.option("--epochs", type=int, default=10, show_default=True, help="Epochs for the detectors and the rectifier.")
@click.option("--eps", default="16/255", show_default=True, help="L-inf budget of the training PGD, pixels in [0, 1].")
@click.option("--steps", type=int, default=10, show_default=True, help="Steps of the training PGD (step eps/4).")
@click.option("--width", type=int, default=16, show_default=True, help="Width of the two detector CNNs.")
@click.option("--mask-threshold", type=float, default=0.5, show_default=True,
              help="Suspect pixels: InSen above min + T (max - min) of their image (the paper's alpha).")
@click.option("--mask-prob", type=float, default=0.5, show_default=True,
              help="Chance that a suspect pixel is replaced by a random value.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Path stem: writes OUT.pt (weights) and OUT.json (config).")
@click.option("--force", is_flag=True, help="Overwrite existing GRED files.")
@json_option
def gred(dataset: str, root: str | None, batch_size: int, seed: int, device: str, model_spec: str,
         train_samples: int, epochs: int, eps: str, steps: int, width: int, mask_threshold: float, mask_prob: float,
         out: str, force: bool, as_json: bool) -> None:
    """Train GRED (seed 002) for a saved model: InSen-guided detector and rectifier, saved without pickle.

    `export --external gred:OUT` then writes its score and rectified label on every row (docs/producers.md).
    """
    from pathlib import Path

    from .data.datasets import load_dataset
    from logitguard.files import file_sha256

    from .models.gred import check_settings, save_gred, train_gred
    from .models.classifiers import load_model

    budget = _fraction(eps, "--eps")
    check_settings(train_samples=train_samples, epochs=epochs, eps=budget, alpha=None, steps=steps, width=width,
                    lr=1e-3, rectifier_lr=5e-4, mask_threshold=mask_threshold, mask_prob=mask_prob,
                    batch_size=batch_size)
    stem = Path(out)
    claim_output(str(stem.with_suffix(".pt")), force, directory=False, extra=(str(stem.with_suffix(".json")),))
    model = load_model(model_spec, device=device)
    train_set = load_dataset(dataset, "train", root=root)
    started = time.perf_counter()
    system = train_gred(model, train_set, train_samples=train_samples, epochs=epochs, eps=budget, steps=steps,
                        width=width, mask_threshold=mask_threshold, mask_prob=mask_prob, seed=seed,
                        batch_size=batch_size, device=device)
    system.config["model"] = {"spec": model_spec, "sha256": file_sha256(Path(model_spec).with_suffix(".pt"))}
    system.config["train"]["seconds"] = round(time.perf_counter() - started, 1)
    weights, config = save_gred(system, out, overwrite=force)
    result = {"weights": str(weights), "config": str(config), "train": system.config["train"]}
    emit(result, as_json, f"trained GRED on {system.config['train']['samples']} clean + PGD images "
                          f"({result['train']['seconds']} s); wrote {weights} and {config}")


@main.command("attack-defenses")
@dataset_options
@device_options
@click.option("--model", "model_spec", required=True, help="Path stem of the target model (the table's model).")
@click.option("--defenses", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Pipeline manifest (defenses.json, from `logitguard fit-pipelines`).")
@click.option("--pipelines", default=None, help="Comma-separated pipeline names (default: all in the manifest).")
@click.option("--tier", type=click.Choice(["adaptive", "surrogate", "query"]), default="adaptive", show_default=True,
              help="adaptive: attack through the manifest's own files; surrogate: fit an own copy of the shipped "
                   "pipelines on unused training samples and attack through it; query: only query each pipeline "
                   "as deployed (square sees scores, rays labels only; --param queries=N per sample).")
@click.option("--attacks", default=None,
              help="Defense-aware attacks: routes, defended-pgd, min-margin, evade, apgd-ce, apgd-dlr, apgd-t, "
                   "orthogonal-pgd, selective-pgd, lagrangian, logit-match, or suite (the sequenced suite: each "
                   "attack only on the samples still robust; --param 'sequence=[...]' to choose its attacks) "
                   "[default: routes,defended-pgd,min-margin]; with --tier query: square, rays [default: both].")
@click.option("--judge-draws", type=int, default=5, show_default=True,
              help="Fresh noise draws each partition through a noise-reading pipeline is judged on: draws 1..R-1 "
                   "are written as PARTITION.rK, holding only the samples no earlier draw broke.")
@click.option("--budgets", default="16/255,8/255", show_default=True, help="L-inf budgets, pixels in [0, 1].")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Parameter for every attack, e.g. steps=100, restarts=2, eot=1 (repeatable).")
@click.option("--test-samples", type=int, default=1000, show_default=True,
              help="Test samples (the first of the table's seeded selection).")
@click.option("--after", default=None, metavar="ATTACKS",
              help="adaptive: continue earlier runs: attack only the samples that each pipeline's partitions of "
                   "these attacks (comma-separated, e.g. suite) in --out left unbroken.")
@click.option("--attacker-samples", type=int, default=5000, show_default=True,
              help="surrogate: training samples the attacker uses (never the defender's).")
@click.option("--attacker-attacks", default="clean,fgsm,bim,pgd,mim,deepfool,cw", show_default=True,
              help="surrogate: the attacks of the attacker's own table (its copy of the pipelines learns from "
                   "them, as the defender's did from the table's train split).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="surrogate: where the attacker's table and copy go (default: OUT/../surrogate-work).")
@click.option("--out", required=True, type=click.Path(file_okay=False, exists=True),
              help="The table the defenses were fitted on; the new test partitions join it.")
@json_option
def attack_defenses(dataset: str, root: str | None, batch_size: int, seed: int, device: str, model_spec: str,
                    defenses: str, pipelines: str | None, tier: str, attacks: str | None, budgets: str,
                    params: tuple[str, ...], test_samples: int, attacker_samples: int, attacker_attacks: str,
                    workdir: str | None, out: str, as_json: bool, judge_draws: int, after: str | None) -> None:
    """Attack through saved defenses (adaptive) or through the attacker's own copy (surrogate).

    Writes one test partition per pipeline x attack x budget, ``TIER.PIPELINE.ATTACK.eN`` (N = budget x 255),
    whose rows the real defenses judge later (`logitguard threat`). Finished partitions are skipped.
    """
    from pathlib import Path

    from logitguard.defenses.pipelines import load_pipelines
    from logitguard.tables import read_table, table_columns
    from logitguard.tables.threat import parse_budgets

    from logitguard.files import check_writable

    from .attacks import DEFENSE_ATTACK_NAMES, QUERY_ATTACK_NAMES
    from .data.datasets import load_dataset
    from .export.logits import check_attack_params
    from .models.classifiers import load_model
    from .data.noise import NoiseRecipe
    from .threat.export import export_surrogate, export_through
    from .threat.queries import DEFAULT_QUERY_ATTACKS, export_queries

    _positive(test_samples=test_samples, attacker_samples=attacker_samples, batch_size=batch_size,
              judge_draws=judge_draws)
    known = QUERY_ATTACK_NAMES if tier == "query" else DEFENSE_ATTACK_NAMES
    if attacks is None:
        attacks = ",".join(DEFAULT_QUERY_ATTACKS) if tier == "query" else "routes,defended-pgd,min-margin"
    chosen = [a.strip() for a in attacks.split(",") if a.strip()]
    unknown = sorted(set(chosen) - set(known))
    if not chosen or unknown:
        what = "query attacks" if tier == "query" else "defense-aware attacks"
        raise ProducerError(f"--attacks takes {what} {list(known)} with --tier {tier}, got {attacks!r}")
    attack_params = {}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ProducerError(f"--param {item!r} must look like NAME=VALUE, e.g. steps=100")
        attack_params[key] = _value(raw, item)
    if "eps" in attack_params:
        raise ProducerError("--param eps: the budgets come from --budgets")
    for attack in chosen:  # every --param goes to every attack: each must accept it
        check_attack_params(attack, attack_params, where=f"--param for attack {attack}")
    eps = parse_budgets(budgets)
    if any(e > 1 for e in eps):
        raise ProducerError(f"--budgets must be at most 1 (pixels in [0, 1]), got {budgets!r}")
    if workdir is not None:
        check_writable(workdir, directory=True, error=ProducerError)
    check_writable(out, directory=True, error=ProducerError)
    specs = load_pipelines(defenses)
    if pipelines:
        names = [p.strip() for p in pipelines.split(",") if p.strip()]
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise ProducerError(f"no pipeline(s) {unknown} in {defenses}; it has {sorted(specs)}")
        specs = {n: specs[n] for n in names}
    table = read_table(out, split="train" if tier == "surrogate" else None, attacks=["clean"], columns=[])
    meta = {k: v for k, v in table.metadata.items() if k not in ("attacks", "threat", "schema_version")}
    recipe = NoiseRecipe.from_metadata(meta.get("noise"))
    model = load_model(model_spec, device=device)
    test = load_dataset(dataset, "test", root=root)
    # The new partitions carry the per-row columns the table has, so they join it.
    columns = set(table_columns(out))
    if "external_score" in columns:
        raise ProducerError(f"{out} has an external system's columns (external_score): attack-defenses does not "
                            "run that system; export it into a table of its own")
    common = dict(attacks=chosen, budgets=eps, samples=test_samples, noise=recipe, attack_params=attack_params,
                  seed=seed, batch_size=batch_size, device=device, metadata=meta, judge_draws=judge_draws,
                  features="features" in columns, insen="insen" in columns)
    if after and tier != "adaptive":
        raise ProducerError("--after continues adaptive runs; use it with --tier adaptive")
    if tier == "adaptive":
        chosen_after = [a.strip() for a in (after or "").split(",") if a.strip()]
        report = export_through(model, test, specs, out=out, after=chosen_after, **common)
    elif tier == "query":
        report = export_queries(model, test, specs, out=out, **common)
    else:
        work = Path(workdir) if workdir else Path(out).parent / "surrogate-work"
        report = export_surrogate(model, load_dataset(dataset, "train", root=root), test, specs, out=out,
                                  workdir=work, defender_ids=table.sample_id, attacker_samples=attacker_samples,
                                  attacker_attacks=_attacker_attacks(attacker_attacks), **common)
    _echo_report(report, out, as_json)


def _attacker_attacks(spec: str) -> list[str]:
    """--attacker-attacks: the oblivious attacks of the surrogate attacker's own table, clean included."""
    from .export.logits import plan_attacks

    chosen = [a.strip() for a in spec.split(",") if a.strip()]
    if "clean" not in chosen:
        raise ProducerError(f"--attacker-attacks must include clean (the copy calibrates on clean rows), got {spec!r}")
    plan_attacks(chosen, {}, {})
    return chosen


def _echo_report(report, out: str, as_json: bool) -> None:
    """What an export wrote and skipped, with seconds and rows/s per partition (or all of it as JSON)."""
    if as_json:
        echo_json({"written": [str(p) for p in report.written], "skipped": [str(p) for p in report.skipped],
                   "timings": report.timings})
        return
    rows = [[t["split"], t["attack"], str(t["rows"]), f"{t['seconds']:.1f}", f"{t['rows'] / t['seconds']:.0f}"]
            for t in report.timings]
    if rows:
        click.echo("\n".join(render_table(["split", "attack", "rows", "seconds", "rows/s"], rows, left=2)))
    click.echo(f"wrote {len(report.written)} file(s), skipped {len(report.skipped)} existing under {out}")


def parse_params(items: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]]:
    """``["pgd.eps=8/255", "cw.steps=50"]`` → ``{"pgd": {"eps": 0.031…}, "cw": {"steps": 50}}``.

    ATTACK may be an alias with dots (``pgd.e8.eps=8/255``): the name is after the last dot.
    Values are JSON (numbers, true/false, strings in quotes) or a fraction such as ``8/255``.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        attack, dot, name = key.rpartition(".")
        if not sep or not dot or not attack or not name:
            raise ProducerError(f"--param {item!r} must look like ATTACK.NAME=VALUE, e.g. pgd.eps=8/255")
        out.setdefault(attack, {})[name] = _value(raw, item)
    return out


def parse_sweeps(items: tuple[str, ...] | list[str]) -> list[Sweep]:
    """``["pgd.eps=2/255,4/255"]`` → ``[Sweep("pgd", "eps", (("2/255", 0.0078…), ("4/255", 0.0156…)))]``.

    ATTACK.NAME as in `parse_params`; the values are comma-separated, each read as ``--param`` reads one.
    """
    from .export.logits import Sweep

    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        attack, dot, name = key.rpartition(".")
        texts = [t.strip() for t in raw.split(",") if t.strip()]
        if not sep or not dot or not attack or not name or not texts:
            raise ProducerError(f"--sweep {item!r} must look like ATTACK.NAME=V1,V2,…, e.g. pgd.eps=2/255,4/255")
        out.append(Sweep(attack, name, tuple((t, _value(t, item, option="--sweep")) for t in texts)))
    return out


def _value(raw: str, item: str, option: str = "--param") -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return float(Fraction(raw))
    except (ValueError, ZeroDivisionError):
        raise ProducerError(f"{option} {item!r}: cannot read {raw!r} as a number, true/false or JSON") from None


def _splits(spec: str) -> list[str]:
    """``"train,test"`` → ``["train", "test"]``; only the dataset splits the producer knows."""
    from .export.logits import SPLITS

    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SPLITS]
    if not chosen or unknown:
        raise ProducerError(f"--splits takes train and/or test, got {spec!r}")
    return list(dict.fromkeys(chosen))


def _sample_caps(spec: str) -> dict[str, int]:
    """``"deepfool=2000,cw=2000"`` → ``{"deepfool": 2000, "cw": 2000}``."""
    caps = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise ProducerError(f"--max-samples item {item!r} must look like NAME=N")
        if int(value) < 1:
            raise ProducerError(f"--max-samples item {item!r}: N must be at least 1")
        caps[key] = int(value)
    return caps


def _model_metadata(model, spec: str) -> dict[str, Any]:
    keep = ("arch", "dataset", "num_classes", "test_accuracy", "train_seconds", "train", "activation", "logit_sign")
    return {"spec": spec, **{k: model.config[k] for k in keep if k in model.config}}


if __name__ == "__main__":
    main()
