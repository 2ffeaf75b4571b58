"""Old module names keep working: ``logitguard.corrector`` is ``logitguard.defenses.corrector``, and so on.

The core was reorganised into packages that name the architecture (docs/architecture.md). `install` puts
one meta-path finder in front of `sys.meta_path` that answers for the old names only: importing one
imports the new module (lazily, on first use of the old name) and binds the *same module object* under
the old name in `sys.modules`, so ``import logitguard.corrector`` and ``import logitguard.defenses.corrector``
give one module, one `LogitCorrector` class and one `REGISTRY`. Submodules follow their package
(``logitguard.detectors.odds`` is ``logitguard.defenses.detectors.odds``). `producers` installs its own map
through the same finder. Saved files name their estimator through `REGISTRY`, never a module path, so
they are unaffected.

Nothing here imports anything beyond the standard library: ``import logitguard`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from importlib.machinery import ModuleSpec
from types import ModuleType

# old name -> new name (modules and packages of the core, before -> after the reorganisation)
CORE_ALIASES: dict[str, str] = {
    "logitguard.stream": "logitguard.tables.stream",
    "logitguard.estimator": "logitguard.defenses.estimator",
    "logitguard.detectors": "logitguard.defenses.detectors",
    "logitguard.detector_kinds": "logitguard.defenses.detector_kinds",
    "logitguard.corrector": "logitguard.defenses.corrector",
    "logitguard._corrector_net": "logitguard.defenses._corrector_net",
    "logitguard.svm": "logitguard.defenses.svm",
    "logitguard.defense": "logitguard.defenses.gated",
    "logitguard.guard": "logitguard.defenses.guard",
    "logitguard.pipelines": "logitguard.defenses.pipelines",
    "logitguard.shipped": "logitguard.defenses.shipped",
    "logitguard.metrics": "logitguard.evaluation.metrics",
    "logitguard.evaluate": "logitguard.evaluation.evaluate",
    "logitguard.threat": "logitguard.evaluation.threat",
    "logitguard.curves": "logitguard.evaluation.curves",
    "logitguard.modelside": "logitguard.evaluation.modelside",
    "logitguard.demo": "logitguard.report.demo",
    "logitguard.plots": "logitguard.report.plots",
    "logitguard.published": "logitguard.report.published",
    "logitguard.summary": "logitguard.report.summary",
}


class _AliasLoader:
    """Loads an old name by importing its new module and handing that very module back."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: ModuleSpec | None = None

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system overwrites __spec__ with the alias's; put it back below
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # already executed under its new name: nothing to run


class AliasFinder:
    """A meta-path finder that answers for the old names in `aliases` (and their submodules) only."""

    def __init__(self, aliases: Mapping[str, str]) -> None:
        self.aliases = dict(aliases)

    def target(self, fullname: str) -> str | None:
        """The new name of `fullname`, or None if it is not an old name (nor inside one)."""
        parts = fullname.split(".")
        for cut in range(len(parts), 1, -1):
            new = self.aliases.get(".".join(parts[:cut]))
            if new is not None:
                return ".".join([new, *parts[cut:]])
        return None

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        new = self.target(fullname)
        if new is None:
            return None
        return ModuleSpec(fullname, _AliasLoader(new))


def install(aliases: Mapping[str, str]) -> AliasFinder:
    """Put a finder for `aliases` (old name -> new name) first on `sys.meta_path`, once per map."""
    for finder in sys.meta_path:
        if isinstance(finder, AliasFinder) and finder.aliases == dict(aliases):
            return finder
    finder = AliasFinder(aliases)
    sys.meta_path.insert(0, finder)
    return finder
