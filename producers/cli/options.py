"""What every `logitguard-produce` command shares: the command group (which refuses early without torch),
the dataset and device options, and the parsers of option values (budgets, attack parameters, sweeps).

Built on the core's public `logitguard.cli.options` (error handling, JSON output, output claims, engines).
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import click

from logitguard.cli.options import ErrorReportingGroup, echo_json
from logitguard.report.summary import render_table

from ..errors import ProducerError

if TYPE_CHECKING:
    from producers.export.attack_specs import Sweep

__all__ = ["check_positive", "dataset_options", "device_options", "echo_report", "main", "model_metadata",
           "parse_fraction", "parse_params", "parse_sample_caps", "parse_splits", "parse_sweeps", "parse_value"]


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


def parse_fraction(raw: str, option: str) -> float:
    """``"16/255"`` or ``"0.06"`` → float; ProducerError naming `option` otherwise."""
    try:
        return float(Fraction(raw.strip()))
    except (ValueError, ZeroDivisionError):
        raise ProducerError(f"{option} must be a number or a fraction such as 16/255, got {raw!r}") from None


def check_positive(**values: int | None) -> None:
    """ProducerError naming the option when a count is below 1 (None: not given)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ProducerError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def echo_report(report, out: str, as_json: bool) -> None:
    """What an export wrote and skipped, with seconds and rows/s per partition (or all of it as JSON)."""
    if as_json:
        echo_json({"written": [str(p) for p in report.written], "skipped": [str(p) for p in report.skipped],
                   "settled": report.settled, "timings": report.timings})
        return
    rows = [[t["split"], t["attack"], str(t["rows"]), f"{t['seconds']:.1f}", f"{t['rows'] / t['seconds']:.0f}"]
            for t in report.timings]
    if rows:
        click.echo("\n".join(render_table(["split", "attack", "rows", "seconds", "rows/s"], rows, left=2)))
    click.echo(f"wrote {len(report.written)} file(s), skipped {len(report.skipped)} existing under {out}")
    if report.settled:
        click.echo(f"not written, no sample left to attack: {', '.join(report.settled)}")


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
        out.setdefault(attack, {})[name] = parse_value(raw, item)
    return out


def parse_sweeps(items: tuple[str, ...] | list[str]) -> list[Sweep]:
    """``["pgd.eps=2/255,4/255"]`` → ``[Sweep("pgd", "eps", (("2/255", 0.0078…), ("4/255", 0.0156…)))]``.

    ATTACK.NAME as in `parse_params`; the values are comma-separated, each read as ``--param`` reads one.
    """
    from producers.export.attack_specs import Sweep

    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        attack, dot, name = key.rpartition(".")
        texts = [t.strip() for t in raw.split(",") if t.strip()]
        if not sep or not dot or not attack or not name or not texts:
            raise ProducerError(f"--sweep {item!r} must look like ATTACK.NAME=V1,V2,…, e.g. pgd.eps=2/255,4/255")
        out.append(Sweep(attack, name, tuple((t, parse_value(t, item, option="--sweep")) for t in texts)))
    return out


def parse_value(raw: str, item: str, option: str = "--param") -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return float(Fraction(raw))
    except (ValueError, ZeroDivisionError):
        raise ProducerError(f"{option} {item!r}: cannot read {raw!r} as a number, true/false or JSON") from None


def parse_splits(spec: str) -> list[str]:
    """``"train,test"`` → ``["train", "test"]``; only the dataset splits the producer knows."""
    from producers.export.plan import SPLITS

    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SPLITS]
    if not chosen or unknown:
        raise ProducerError(f"--splits takes train and/or test, got {spec!r}")
    return list(dict.fromkeys(chosen))


def parse_sample_caps(spec: str) -> dict[str, int]:
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


def model_metadata(model, spec: str) -> dict[str, Any]:
    keep = ("arch", "dataset", "num_classes", "test_accuracy", "train_seconds", "train", "activation", "logit_sign")
    return {"spec": spec, **{k: model.config[k] for k in keep if k in model.config}}
