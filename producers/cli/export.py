"""Commands that write logit tables: `export` (clean, oblivious and transfer attacks) and `attack-defenses`
(attacks through saved defenses: adaptive, surrogate and query threat models)."""

from __future__ import annotations

from functools import partial

import click

from logitguard.cli.options import budgets_option, comma_list, engine_option, json_option, on_ray

from ..errors import ProducerError
from .options import (check_positive, dataset_options, device_options, echo_report, main, model_metadata,
                      parse_params, parse_sample_caps, parse_splits, parse_sweeps, parse_value)


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

    from ..data.datasets import load_dataset
    from ..export.logits import export as run_export
    from producers.export.plan import Shard
    from producers.export.attack_specs import expand_sweeps, plan_attacks
    from ..models.classifiers import resolve_model
    from ..data.noise import DEFAULT_NOISE, NoiseRecipe

    # Everything that needs neither data nor model is checked first.
    check_positive(train_samples=train_samples, test_samples=test_samples, batch_size=batch_size)
    if noise_queries < 0:
        raise ProducerError(f"--noise-queries must be 0 (none) or more, got {noise_queries}")
    if sweeps and click.get_current_context().get_parameter_source("attacks").name == "DEFAULT":
        attacks = "clean"  # a sweep's table: the clean rows and the swept attack only
    attack_names = comma_list(attacks)
    attack_params, attack_samples = parse_params(params), parse_sample_caps(caps)
    attack_names, attack_params, attack_samples, sweep_entries = expand_sweeps(
        attack_names, attack_params, attack_samples, parse_sweeps(sweeps))
    plan_attacks(attack_names, attack_params, attack_samples)
    shard_spec = Shard.parse(shard)
    if external is not None:
        from ..models.gred import parse_external

        parse_external(external)
    if engine == "ray" and shard_spec != Shard():
        raise ProducerError("--shard is for single-process runs; --engine ray runs every shard of --workers N")
    chosen_splits = parse_splits(splits)
    recipe = NoiseRecipe.parse(noise or DEFAULT_NOISE, noise_queries) if noise_queries > 0 else None
    check_writable(out, directory=True, error=ProducerError)  # partitions are staged beside --out
    scale = on_ray(engine, workers, "producers.export.scale")
    model = resolve_model(model_spec, weights=weights, device="cpu" if scale else device)
    options = dict(
        attacks=attack_names, samples={"train": train_samples, "test": test_samples},
        attack_samples=attack_samples, attack_params=attack_params, noise=recipe, features=features, insen=insen,
        external=external, seed=seed, batch_size=batch_size, substitute=substitute, sweeps=sweep_entries,
        metadata={"dataset": {"name": dataset}, "model": model_metadata(model, model_spec)},
    )
    if scale:  # each actor loads the dataset as this process would
        report = scale.export_ray(model, partial(scale.load_splits, dataset, chosen_splits, root), out=out,
                                  workers=workers, device=device, cpus_per_worker=cpus_per_worker, **options)
    else:
        data = {s: load_dataset(dataset, s, root=root) for s in chosen_splits}
        report = run_export(model, data, out=out, shard=shard_spec, device=device, **options)
    echo_report(report, out, as_json)


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
                   "[default: routes,defended-pgd,min-margin]; ALIAS=ATTACK runs ATTACK again under the partition "
                   "name ALIAS (e.g. lagrangian-fool=lagrangian, to continue with other --param); with --tier "
                   "query: square, rays [default: both].")
@click.option("--judge-draws", type=int, default=5, show_default=True,
              help="Fresh noise draws each partition through a noise-reading pipeline is judged on: draws 1..R-1 "
                   "are written as PARTITION.rK, holding only the samples no earlier draw broke.")
@budgets_option("L-inf budgets, pixels in [0, 1].")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Parameter for every attack, e.g. steps=100, restarts=2, eot=1 (repeatable).")
@click.option("--test-samples", type=int, default=1000, show_default=True,
              help="Test samples (the first of the table's seeded selection).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True,
              help="adaptive: the split to attack. train: the attacker's view of what the defender learns from, "
                   "for fitting detectors on adaptive attacks; partitions adaptive-train.PIPELINE.ATTACK.eN, on "
                   "--train-samples samples outside the detector's calibration hold-out.")
@click.option("--train-samples", type=int, default=1000, show_default=True,
              help="With --split train: samples (the first of the train split's seeded selection outside the "
                   "detectors' calibration hold-out; each must have a clean row in the table).")
@click.option("--after", default=None, metavar="ATTACKS",
              help="adaptive: continue earlier runs: attack only the samples that each pipeline's partitions of "
                   "these attacks (comma-separated, e.g. suite) in --out left unbroken.")
@click.option("--focus", default=None, metavar="PIPELINE:ATTACKS",
              help="adaptive: attack only the samples that PIPELINE's partitions of ATTACKS (same budget) broke, "
                   "e.g. none:suite: where the bare model holds, a pipeline that answers its label or abstains "
                   "holds too, so those are the samples its gain rests on.")
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
                    workdir: str | None, out: str, as_json: bool, judge_draws: int, after: str | None,
                    focus: str | None = None, split: str = "test", train_samples: int = 1000) -> None:
    """Attack through saved defenses (adaptive) or through the attacker's own copy (surrogate).

    Writes one test partition per pipeline x attack x budget, ``TIER.PIPELINE.ATTACK.eN`` (N = budget x 255),
    whose rows the real defenses judge later (`logitguard threat`). Finished partitions are skipped.
    With --split train (adaptive only) the partitions go to the train split as ``adaptive-train.…``, for
    fitting a detector on them (`logitguard fit-pipelines --attacks`; `fit-adversarially` does it in rounds).
    """
    from pathlib import Path

    from logitguard.defenses.pipelines import load_pipelines
    from logitguard.tables import read_table, table_columns
    from logitguard.tables.threat import parse_budgets

    from logitguard.files import check_writable

    from ..attacks import DEFENSE_ATTACK_NAMES, QUERY_ATTACK_NAMES
    from ..data.datasets import load_dataset
    from ..models.classifiers import load_model
    from ..data.noise import NoiseRecipe
    from ..threat.export import export_surrogate, export_through, split_alias
    from ..threat.queries import DEFAULT_QUERY_ATTACKS, export_queries

    check_positive(test_samples=test_samples, attacker_samples=attacker_samples, batch_size=batch_size,
              judge_draws=judge_draws, train_samples=train_samples)
    if split != "test" and tier != "adaptive":
        raise ProducerError(f"--split {split} is for --tier adaptive (the {tier} tier attacks the test split)")
    given = click.get_current_context().get_parameter_source
    wrong = "train_samples" if split == "test" else "test_samples"
    if given(wrong).name != "DEFAULT":
        raise ProducerError(f"--{wrong.replace('_', '-')} does not apply with --split {split}; use "
                            f"--{split}-samples")
    known = QUERY_ATTACK_NAMES if tier == "query" else DEFENSE_ATTACK_NAMES
    if attacks is None:
        attacks = ",".join(DEFAULT_QUERY_ATTACKS) if tier == "query" else "routes,defended-pgd,min-margin"
    chosen = comma_list(attacks)
    real = chosen if tier == "query" else [split_alias(a)[1] for a in chosen]
    unknown = sorted(set(real) - set(known))
    if not chosen or unknown or any(not split_alias(a)[0] for a in chosen):
        what = "query attacks" if tier == "query" else "defense-aware attacks"
        raise ProducerError(f"--attacks takes {what} {list(known)} with --tier {tier}, got {attacks!r}")
    attack_params = defense_params(params, real)
    eps = parse_budgets(budgets)
    if any(e > 1 for e in eps):
        raise ProducerError(f"--budgets must be at most 1 (pixels in [0, 1]), got {budgets!r}")
    if workdir is not None:
        check_writable(workdir, directory=True, error=ProducerError)
    check_writable(out, directory=True, error=ProducerError)
    specs = every_spec = load_pipelines(defenses)
    if pipelines:
        names = comma_list(pipelines)
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise ProducerError(f"no pipeline(s) {unknown} in {defenses}; it has {sorted(specs)}")
        specs = {n: specs[n] for n in names}
    table = read_table(out, split="train" if tier == "surrogate" else None, attacks=["clean"], columns=[])
    meta = {k: v for k, v in table.metadata.items() if k not in ("attacks", "threat", "schema_version")}
    recipe = NoiseRecipe.from_metadata(meta.get("noise"))
    model = load_model(model_spec, device=device)
    test = load_dataset(dataset, split, root=root)  # the split attacked (train: --split train)
    # The new partitions carry the per-row columns the table has, so they join it.
    columns = set(table_columns(out))
    if "external_score" in columns:
        raise ProducerError(f"{out} has an external system's columns (external_score): attack-defenses does not "
                            "run that system; export it into a table of its own")
    common = dict(attacks=chosen, budgets=eps, samples=test_samples if split == "test" else train_samples, noise=recipe, attack_params=attack_params,
                  seed=seed, batch_size=batch_size, device=device, metadata=meta, judge_draws=judge_draws,
                  features="features" in columns, insen="insen" in columns)
    if (after or focus) and tier != "adaptive":
        raise ProducerError("--after and --focus continue adaptive runs; use them with --tier adaptive")
    if tier == "adaptive":
        chosen_after = comma_list(after or "")
        report = export_through(model, test, specs, out=out, after=chosen_after,
                                focus=_focus(focus, every_spec, defenses), **common)
    elif tier == "query":
        report = export_queries(model, test, specs, out=out, **common)
    else:
        work = Path(workdir) if workdir else Path(out).parent / "surrogate-work"
        report = export_surrogate(model, load_dataset(dataset, "train", root=root), test, specs, out=out,
                                  workdir=work, defender_ids=table.sample_id, attacker_samples=attacker_samples,
                                  attacker_attacks=_attacker_attacks(attacker_attacks), **common)
    echo_report(report, out, as_json)


def _focus(raw: str | None, specs: dict, defenses: str) -> tuple | None:
    """--focus PIPELINE:ATTACKS as `export_through`'s ``(pipeline, spec, attacks)``, or None."""
    if raw is None:
        return None
    name, _, attacks = raw.partition(":")
    name, chosen = name.strip(), comma_list(attacks)
    if not name or not chosen:
        raise ProducerError(f"--focus takes PIPELINE:ATTACKS (e.g. none:suite), got {raw!r}")
    if name not in specs:
        raise ProducerError(f"--focus: no pipeline {name!r} in {defenses}; it has {sorted(specs)}")
    return name, specs[name], chosen


def defense_params(params: tuple[str, ...], attacks: list[str]) -> dict:
    """--param NAME=VALUE (repeatable) of the defense-aware commands: every parameter goes to every attack in
    `attacks`, so each must accept it (checked before anything is loaded); eps comes from --budgets."""
    from producers.export.attack_specs import check_attack_params

    attack_params = {}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ProducerError(f"--param {item!r} must look like NAME=VALUE, e.g. steps=100")
        attack_params[key] = parse_value(raw, item)
    if "eps" in attack_params:
        raise ProducerError("--param eps: the budgets come from --budgets")
    for attack in attacks:  # every --param goes to every attack: each must accept it
        check_attack_params(attack, attack_params, where=f"--param for attack {attack}")
    return attack_params


def _attacker_attacks(spec: str) -> list[str]:
    """--attacker-attacks: the oblivious attacks of the surrogate attacker's own table, clean included."""
    from producers.export.attack_specs import plan_attacks

    chosen = comma_list(spec)
    if "clean" not in chosen:
        raise ProducerError(f"--attacker-attacks must include clean (the copy calibrates on clean rows), got {spec!r}")
    plan_attacks(chosen, {}, {})
    return chosen
