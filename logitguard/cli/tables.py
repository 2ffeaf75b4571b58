"""Commands about a table itself: `inspect`."""

from __future__ import annotations

import click

from .options import echo_json, json_option, main, table_argument


@main.command()
@table_argument
@json_option
def inspect(table: str, as_json: bool) -> None:
    """Summarise a logit table: rows, accuracy and attack success per split x attack."""
    from ..engines.stream import summarize_path
    from ..report.summary import format_summary

    summary = summarize_path(table)
    if as_json:
        echo_json(summary)
    else:
        click.echo(format_summary(summary))
