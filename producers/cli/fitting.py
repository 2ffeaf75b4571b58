"""`fit-adversarially`: fit a pipeline's detector on the adaptive attacks that beat it, in rounds
(`producers.threat.adversarial_fit`; docs/threat-models.md, "Adversarially fitted detectors")."""

from __future__ import annotations

import click

from logitguard.cli.options import budgets_option, comma_list, echo_json, json_option

from ..errors import ProducerError
from .export import defense_params
from .options import check_positive, dataset_options, device_options, main


@main.command("fit-adversarially")
@dataset_options
@device_options
@click.option("--model", "model_spec", required=True, help="Path stem of the target model (the table's model).")
@click.option("--defenses", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The starting pipeline manifest (defenses.json, e.g. from `logitguard fit-pipelines`).")
@click.option("--pipelines", default="ln-reject", show_default=True,
              help="Comma-separated pipelines whose detector is refitted, same kind and parameters "
                   "(their files are attacked).")
@click.option("--out", required=True, type=click.Path(file_okay=False, exists=True),
              help="The table the defenses were fitted on; each round's train partitions "
                   "(adaptive-round<R>.PIPELINE.ATTACK.eN) join it.")
@click.option("--workdir", required=True, type=click.Path(file_okay=False),
              help="Where round R's files and manifest go: WORKDIR/round-R/defenses.json (must hold no earlier fit).")
@click.option("--rounds", type=int, default=3, show_default=True, help="At most this many rounds.")
@click.option("--train-samples", type=int, default=1000, show_default=True,
              help="Train samples attacked every round (the first of the split's seeded selection outside the "
                   "detector's calibration hold-out; each must have a clean row in the table).")
@click.option("--attacks", default="suite", show_default=True,
              help="Defense-aware attacks each round runs (as attack-defenses; --param 'sequence=[...]' for the suite).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Parameter for every attack, e.g. steps=25 (repeatable; as attack-defenses).")
@budgets_option("L-inf budgets, pixels in [0, 1].")
@click.option("--fit-attacks", default=None, metavar="ATTACKS",
              help="The original attacks every refit learns from besides the rounds' [default: the train split's "
                   "oblivious and transfer attacks, as fit-pipelines].")
@click.option("--judge-draws", type=int, default=5, show_default=True,
              help="Fresh noise draws a round's success is judged on (as attack-defenses).")
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="Stop when a round's attack success rate is not lower than the previous round's by more than this.")
@json_option
def fit_adversarially_command(dataset: str, root: str | None, batch_size: int, seed: int, device: str,
                              model_spec: str, defenses: str, pipelines: str, out: str, workdir: str, rounds: int,
                              train_samples: int, attacks: str, params: tuple[str, ...], budgets: str,
                              fit_attacks: str | None, judge_draws: int, tolerance: float, as_json: bool) -> None:
    """Fit a detector on the adaptive attacks that beat it: round R attacks round R-1's files on the train
    split and refits on the original attacks plus every round's rows that fooled the model.

    Prints per round the attack success rate, the refitted threshold and its clean FPR on the calibration
    rows and on the table's test clean rows. What the final files are worth must be measured afresh on the
    test split (attack-defenses, logitguard threat).
    """
    from dataclasses import asdict

    from logitguard.files import check_writable
    from logitguard.tables.threat import parse_budgets

    from ..attacks import DEFENSE_ATTACK_NAMES
    from ..data.datasets import load_dataset
    from ..models.classifiers import load_model
    from ..threat.adversarial_fit import fit_adversarially, format_rounds

    check_positive(rounds=rounds, train_samples=train_samples, batch_size=batch_size, judge_draws=judge_draws)
    if not 0 <= tolerance < 1:
        raise ProducerError(f"--tolerance must be in [0, 1), got {tolerance}")
    chosen = comma_list(attacks)
    unknown = sorted(set(chosen) - set(DEFENSE_ATTACK_NAMES))
    if not chosen or unknown:
        raise ProducerError(f"--attacks takes defense-aware attacks {list(DEFENSE_ATTACK_NAMES)}, got {attacks!r}")
    attack_params = defense_params(params, chosen)
    eps = parse_budgets(budgets)
    if any(e > 1 for e in eps):
        raise ProducerError(f"--budgets must be at most 1 (pixels in [0, 1]), got {budgets!r}")
    names = comma_list(pipelines)
    learn = None if fit_attacks is None else comma_list(fit_attacks)
    check_writable(out, directory=True, error=ProducerError)
    check_writable(workdir, directory=True, error=ProducerError)
    model = load_model(model_spec, device=device)
    fit = fit_adversarially(model, load_dataset(dataset, "train", root=root), table=out, defenses=defenses,
                            workdir=workdir, pipelines=names, rounds=rounds, samples=train_samples, attacks=chosen,
                            attack_params=attack_params, budgets=eps, fit_attacks=learn, judge_draws=judge_draws,
                            tolerance=tolerance, seed=seed, batch_size=batch_size, device=device,
                            progress=not as_json)
    if as_json:
        echo_json({"manifest": str(fit.manifest), "stopped": fit.stopped, "start": fit.start,
                   "rounds": [asdict(r) for r in fit.rounds]})
    else:
        click.echo(format_rounds(fit))
