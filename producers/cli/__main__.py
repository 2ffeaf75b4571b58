"""``python -m producers.cli``: the `logitguard-produce` command."""

from . import main

main()
