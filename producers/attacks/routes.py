"""Routes: per sample, the cheapest way to make a detect→correct pipeline answer wrongly.

A gated pipeline can fail in three ways, and the cheapest differs per sample (`routes_for`): slip
past the detector with a wrong model label (``evade``); get flagged on purpose where the corrector
is wrong (``flag``), which turns a model that was still right into a wrong answer; or make model and
corrector wrong together (``both``). Each route runs on the samples the earlier routes did not break.
"""

from __future__ import annotations

from typing import ClassVar

from .defended import DefenseAttack


class Routes(DefenseAttack):
    """Every applicable route in turn, each on the samples still answered right."""

    name: ClassVar[str] = "routes"
