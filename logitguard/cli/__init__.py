"""The `logitguard` command: a thin layer over the library (open input → one library call → print).

One module per command group, all on the group `main` of `options` (which also holds what the commands
share): `tables` (inspect), `defenses` (train-corrector, correct, train-svm, fit-detector, detect, defend,
fit-pipelines), `evaluation` (evaluate, transfer, sweep-p-clean, threat, compare-models, curve), `guard`,
`report` (explain, demo) and `serve`. Each command imports what it needs when it runs, so
``logitguard --help`` stays fast and torch-free.

Errors about the user's input (`LogitguardError`) are printed as ``Error: …`` with exit status 1 and no
traceback.
"""

from __future__ import annotations

from . import defenses, evaluation, guard, report, serve, tables  # noqa: F401 (each registers its commands)
from .options import main

__all__ = ["main"]
