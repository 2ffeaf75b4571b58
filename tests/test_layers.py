"""The layers of docs/architecture.md hold in the code: import-linter's contracts (pyproject.toml), no import
cycle between modules, and loading a guard stays clear of the evaluation and report layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

importlinter = pytest.importorskip("importlinter.cli", reason="the dev extra installs import-linter")
grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)
    code = importlinter.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, "an import runs against the layers; run `lint-imports` for the chains"


def _cycles(graph, package: str) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative) among `package`'s modules."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    edges = {m: sorted(n for n in graph.find_modules_directly_imported_by(m) if n in set(modules)) for m in modules}
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter[0]
                counter[0] += 1
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                child = edges[node][i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


@pytest.mark.parametrize("package", ["logitguard", "producers"])
def test_no_import_cycle(package):
    graph = grimp.build_graph(package)
    # A package's __init__ re-exporting its modules is not a cycle of ideas: leave package roots out.
    for module in [m for m in graph.modules if graph.find_children(m)]:
        graph.remove_module(module)
    assert _cycles(graph, package) == []


def test_loading_a_guard_imports_no_evaluation_or_report_module(digits_split_table, tmp_path):
    from logitguard.evaluation.guard import fit_guard

    path = fit_guard(digits_split_table, detector="msp", budgets=(0.2,)).save(tmp_path / "guard.npz")
    code = ("import sys; from logitguard.defenses.guard import Guard; import numpy as np; "
            "g = Guard.load(sys.argv[1]); g.check(np.zeros((2, g.num_classes))); "
            "print(sorted(m for m in sys.modules if m.startswith(('logitguard.evaluation', 'logitguard.report', "
            "'torch'))))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
