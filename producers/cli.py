"""The `logitguard-produce` command: train models and export logit tables."""

from __future__ import annotations

import click

from logitguard.cli import _Group


@click.group(cls=_Group)
@click.version_option(package_name="logitguard")
def main() -> None:
    """Train classifiers, run attacks and export clean/adversarial logit tables."""
