"""Commands that make classifiers and model-side systems: `train`, `retrofit` (another activation) and
`gred`."""

from __future__ import annotations

import time

import click

from logitguard.cli.options import claim_output, emit, json_option

from ..errors import ProducerError
from .options import check_positive, dataset_options, device_options, main, parse_fraction


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

    from ..data.datasets import load_dataset
    from ..models.classifiers import accuracy, parse_activation, save_model, small_cnn_for
    from ..models.training import make_objective, objective_record, train_model, training_subset

    check_positive(epochs=epochs, width=width, batch_size=batch_size, train_samples=train_samples)
    if not lr > 0:
        raise ProducerError(f"--lr must be positive, got {lr}")
    goal = make_objective(objective, eps=parse_fraction(at_eps, "--at-eps"), steps=at_steps,
                          alpha=None if at_alpha is None else parse_fraction(at_alpha, "--at-alpha"),
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

    from ..data.datasets import load_dataset
    from ..models.classifiers import accuracy, build_model, load_model, parse_activation, save_model

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

    from ..data.datasets import load_dataset
    from logitguard.files import file_sha256

    from ..models.gred import check_settings, save_gred, train_gred
    from ..models.classifiers import load_model

    budget = parse_fraction(eps, "--eps")
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
