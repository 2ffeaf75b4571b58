"""logitguard: detect, correct and explain adversarial attacks from a classifier's logits alone.

The core reads only logit tables (see `logitguard.tables` and docs/tables.md); it never touches images,
models or attacks, and imports neither torchvision nor the `producers` package. Torch is needed only to
train correctors (the ``train`` extra); applying saved defenses needs NumPy, pandas and pyarrow.

The public API is the names in `__all__` (docs/api.md): tables, the defenses and every detector kind.
Each is imported from its home module on first use (PEP 562), so ``import logitguard`` and
``logitguard --help`` stay fast, and ``from logitguard import Guard`` imports the defenses only. The
packages and what each holds: docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import LogitguardError, TableError

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first used)
_HOMES: dict[str, str] = {
    **dict.fromkeys(["LogitTable", "Pair", "TableSource", "pair", "read_table", "to_pandas", "write_table"], ".tables"),
    "ABSTAIN": ".defenses.decision",
    "Decision": ".defenses.decision",
    "DETECTOR_KINDS": ".defenses.detector_kinds",
    **dict.fromkeys(["Detector", "load_detector", "make_detector", "MSPDetector", "MaxLogitDetector",
                     "EnergyDetector", "NonMEDetector", "InsenDetector", "KDensityDetector", "LearnedDetector",
                     "NoisyLearnedDetector", "RankedNoisyLearnedDetector", "OddsTest", "SingleShotOddsTest",
                     "OddsCorrector"],
                    ".defenses.detectors"),
    "LogitCorrector": ".defenses.corrector",
    "SVMCorrector": ".defenses.svm",
    "GatedDefense": ".defenses.gated",
    "load_corrector": ".defenses.gated",
    "Guard": ".defenses.guard",
    **dict.fromkeys(["fit_guard", "guard_from_pipeline", "describe_guard"], ".evaluation.guard"),
    **dict.fromkeys(["evaluate", "detection_table"], ".evaluation.evaluate"),
    "threat_model_table": ".evaluation.threat",
    **dict.fromkeys(["NoiseRecipe", "noisy_copies", "query_model"], ".noise"),
    **dict.fromkeys(["GuardClient", "ServiceError", "check_model"], ".client"),
}

__all__ = ["LogitguardError", "TableError", "__version__", *_HOMES]


def __getattr__(name: str) -> Any:
    if name == "tables":
        return importlib.import_module(".tables", __name__)
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # importlib, not `from . import`: that would look the name up here again
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
