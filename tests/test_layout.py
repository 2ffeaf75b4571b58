"""The package layout (docs/architecture.md): one name per module, every folder a package."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_saved_files_name_their_estimator_not_a_module(digits_table, tmp_path):
    """A file records its estimator through `REGISTRY` (``msp``), never a module path, so moving a module
    never breaks a saved file."""
    from logitguard.defenses.detectors import make_detector
    from logitguard.defenses.estimator import load_estimator
    from logitguard.files import read_header

    detector = make_detector("msp").fit_table(digits_table, attacks=["fgsm"])
    path = detector.save(tmp_path / "msp.npz")
    header = read_header(path)
    assert header["estimator"] == "msp" and "logitguard.defenses" not in json.dumps(header)
    np.testing.assert_array_equal(load_estimator(path).score_samples(digits_table.logits),
                                  detector.score_samples(digits_table.logits))


@pytest.mark.parametrize("old", ["logitguard.corrector", "logitguard.detectors", "logitguard.stream",
                                 "logitguard._compat", "producers.datasets", "producers.scale"])
def test_module_names_from_before_the_layout_are_gone(old):
    """0.1.0 was never released: the names from before the packages are neither files nor aliases."""
    import sys

    import logitguard  # noqa: F401
    import producers  # noqa: F401

    path = REPO.joinpath(*old.split("."))
    assert not path.with_suffix(".py").exists() and not path.is_dir()
    assert not [f for f in sys.meta_path if type(f).__module__.startswith(("logitguard", "producers"))]


def test_every_source_folder_is_a_package_setuptools_finds():
    from setuptools import find_packages

    found = set(find_packages(str(REPO), include=["logitguard*", "producers*"]))
    folders = {str(p.parent.relative_to(REPO)).replace(os.sep, ".") for top in ("logitguard", "producers")
               for p in (REPO / top).rglob("*.py")}
    assert folders <= found and {"logitguard.defenses.detectors", "producers.export", "logitguard.tables"} <= found
