"""The public API (docs/api.md): every name of `logitguard.__all__` imports, lazily, from its home module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import logitguard

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "producers")
LAYERS = ("logitguard.defenses.", "logitguard.evaluation.", "logitguard.report.", "logitguard.engines.",
          "logitguard.serve.")


@pytest.mark.parametrize("name", logitguard.__all__)
def test_every_public_name_imports(name):
    value = getattr(logitguard, name)
    assert value is not None
    if name not in ("__version__",) and hasattr(value, "__module__"):
        assert value.__module__.startswith("logitguard."), value.__module__
    assert name in dir(logitguard)


def test_public_names_are_the_objects_of_their_home_modules():
    from logitguard.defenses.detectors import KINDS, Detector, make_detector
    from logitguard.defenses.guard import Guard
    from logitguard.tables import read_table

    assert logitguard.Guard is Guard and logitguard.read_table is read_table and logitguard.Detector is Detector
    assert logitguard.DETECTOR_KINDS == KINDS
    for kind in KINDS:  # every detector kind's class is public
        assert getattr(logitguard, type(make_detector(kind)).__name__) is type(make_detector(kind))
    with pytest.raises(AttributeError, match="no attribute 'corrector'"):
        logitguard.corrector


def test_import_logitguard_stays_lazy_and_torch_free():
    """``import logitguard`` (and the CLI, for --help) imports no torch, scikit-learn, producers, nor any layer
    above the tables; the CLI lists the detector kinds through a module that imports nothing."""
    loaded = _run("""
        import json, sys
        import logitguard
        before = sorted(sys.modules)
        import logitguard.cli
        print(json.dumps([before, sorted(sys.modules)]))
    """)
    for modules, allowed in zip(loaded, ([], ["logitguard.defenses.detector_kinds"])):
        heavy = [m for m in modules if m.split(".")[0] in HEAVY or m.startswith(LAYERS)]
        assert heavy == allowed
    assert not [m for m in loaded[0] if m.startswith("logitguard.") and m != "logitguard.errors"]


def test_importing_a_detector_imports_no_evaluation_nor_report():
    loaded = _run("""
        import json, sys
        from logitguard import load_detector, GatedDefense, LogitCorrector
        print(json.dumps(sorted(sys.modules)))
    """)
    assert not [m for m in loaded if m.startswith(("logitguard.evaluation", "logitguard.report", "torch"))]


def _run(code: str):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                            env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
