"""The `logitguard` command: a thin layer over the library (open input → one library call → print).

Errors about the user's input (`LogitguardError`) are printed as ``Error: …`` with exit status 1 and no
traceback.
"""

from __future__ import annotations

import json
from typing import Any

import click

from .errors import LogitguardError


class ErrorReportingGroup(click.Group):
    """A click group that prints LogitguardError as `Error: …` (exit 1) instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LogitguardError as exc:
            raise click.ClickException(str(exc)) from None


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(func)


def table_argument(func):
    return click.argument("table", type=click.Path(path_type=str))(func)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, allow_nan=False))


@click.group(cls=ErrorReportingGroup)
@click.version_option(package_name="logitguard")
def main() -> None:
    """Detect, correct and explain adversarial attacks from a classifier's logits alone."""


@main.command()
@table_argument
@json_option
def inspect(table: str, as_json: bool) -> None:
    """Summarise a logit table: rows, accuracy and attack success per split x attack."""
    from .summary import format_summary, summarize
    from .tables import read_table

    summary = summarize(read_table(table))
    if as_json:
        echo_json(summary)
    else:
        click.echo(format_summary(summary))
