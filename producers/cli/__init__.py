"""The `logitguard-produce` command: train classifiers, run attacks, export clean/adversarial logit tables.

`options` holds the group `main` and what the commands share; `models` (train, retrofit, gred) and
`export` (export, attack-defenses) and `fitting` (fit-adversarially) register their commands on it.
"""

from __future__ import annotations

from . import export, fitting, models  # noqa: F401 (each registers its commands)
from .options import main, parse_params, parse_sweeps

__all__ = ["main", "parse_params", "parse_sweeps"]
