"""The package layout (docs/architecture.md): old module names are the very same modules as the new ones."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import producers
from logitguard._compat import CORE_ALIASES, AliasFinder

REPO = Path(__file__).resolve().parents[1]
ALL_ALIASES = {**CORE_ALIASES, **producers.ALIASES}


@pytest.mark.parametrize("old, new", sorted(ALL_ALIASES.items()))
def test_old_name_is_the_new_module(old, new):
    module = importlib.import_module(old)
    assert module is importlib.import_module(new) is sys.modules[old] is sys.modules[new]
    assert module.__name__ == module.__spec__.name == new  # the alias does not rename the module
    parent, _, leaf = old.rpartition(".")
    assert getattr(sys.modules[parent], leaf) is module  # `import a.b as m` / monkeypatch("a.b.x") resolve


def test_old_names_imported_first_in_a_fresh_interpreter_give_one_class_and_one_registry():
    code = """
        import json, sys
        import logitguard.detectors.odds as old_odds            # a submodule of an old package name
        from logitguard.corrector import LogitCorrector as Old
        from logitguard.estimator import REGISTRY as old_registry
        from logitguard.defenses.corrector import LogitCorrector as New
        from logitguard.defenses.estimator import REGISTRY
        import logitguard.defenses.detectors.odds as new_odds
        print(json.dumps({"odds": old_odds is new_odds, "class": Old is New, "registry": old_registry is REGISTRY,
                          "corrector": REGISTRY["corrector"] is New,
                          "twice": [m for m in sys.modules if m.endswith("corrector") and "defenses" not in m]}))
    """
    out = _run(code)
    assert out == {"odds": True, "class": True, "registry": True, "corrector": True,
                   "twice": ["logitguard.corrector"]}  # the old name is an entry in sys.modules, the same object


def test_import_logitguard_stays_lazy_and_torch_free():
    out = _run("""
        import json, sys
        import logitguard, logitguard.cli
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sklearn", "producers")
                                or m.startswith(("logitguard.defenses.", "logitguard.evaluation.", "logitguard.report.")))))
    """)
    assert out == ["logitguard.defenses.detector_kinds"]  # the CLI lists detector kinds; that module imports nothing


def test_unknown_names_under_an_old_name_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("logitguard.detectors.no_such_detector")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("logitguard.no_such_module")
    finder = AliasFinder({"a.b": "a.c.b"})
    assert finder.target("a.b") == "a.c.b" and finder.target("a.b.x.y") == "a.c.b.x.y"
    assert finder.target("a.bb") is None and finder.target("a") is None and finder.target("a.c.b") is None


def test_modules_that_became_packages_keep_their_names():
    from producers.export import attack_specs, execute, logits, plan, staging
    from producers.models import classifiers, networks

    # logits' and classifiers' names live in several modules now; logits and classifiers re-export them
    for package, modules in ((producers.export, (logits, attack_specs, plan, staging, execute)),
                             (producers.models, (classifiers, networks))):
        defined = set()
        for module in modules:
            tree = ast.parse(Path(module.__file__).read_text())
            defined |= {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
            defined |= {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                        if isinstance(target, ast.Name)}
        assert set(package.__all__) == {name for name in defined if not name.startswith("_")}, package.__name__
        assert all(getattr(package, name) is getattr(modules[0], name) for name in package.__all__)


def test_a_file_saved_before_the_move_loads_through_old_and_new_paths(digits_table, tmp_path):
    from logitguard.files import read_header
    from logitguard.defenses.detectors import make_detector
    from logitguard.estimator import load_estimator as old_load

    path = make_detector("msp").fit_table(digits_table, attacks=["fgsm"], split="test").save(tmp_path / "msp.npz")
    header = read_header(path)
    text = json.dumps(header)  # the estimator is a registry name; no module path, old or new, is stored
    assert header["estimator"] == "msp" and not any(name in text for pair in ALL_ALIASES.items() for name in pair)
    from logitguard.defenses.estimator import load_estimator
    np.testing.assert_array_equal(old_load(path).score_samples(digits_table.logits),
                                  load_estimator(path).score_samples(digits_table.logits))


def test_every_source_folder_is_a_package_setuptools_finds():
    from setuptools import find_packages

    found = set(find_packages(str(REPO), include=["logitguard*", "producers*"]))
    folders = {str(p.parent.relative_to(REPO)).replace(os.sep, ".") for top in ("logitguard", "producers")
               for p in (REPO / top).rglob("*.py")}
    assert folders <= found and {"logitguard.defenses.detectors", "producers.export", "logitguard.tables"} <= found


def _run(code: str):
    import textwrap

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                            env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
