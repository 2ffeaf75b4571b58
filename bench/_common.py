"""Helpers shared by the benchmarks."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from logitguard.defenses.corrector import LogitCorrector, build_mlp  # noqa: E402


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall-clock seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def untrained_corrector(classes: int, hidden: int) -> LogitCorrector:
    """A corrector with random weights: inference and supporting-score costs do not depend on training."""
    corrector = LogitCorrector(hidden=hidden, progress=False)
    corrector._start(classes, None, ["synthetic"])
    corrector.model_ = build_mlp(classes, hidden, corrector.dropout).eval()
    return corrector
