"""The light apply side: saved defenses load and apply with torch unimportable, equal to the torch results.

Torch is blocked in a subprocess by a meta-path finder that raises ImportError for ``torch`` and its
submodules, as if it were not installed. (``sys.modules["torch"] = None`` would not do: SciPy's array-API
helpers look torch up in ``sys.modules`` and trip over the None.) Fitting happens here, with torch; the
subprocess only loads files and applies them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from logitguard import read_table, write_table
from logitguard.defenses.corrector import WEIGHT_KEYS, LogitCorrector
from logitguard.defenses.gated import GatedDefense
from logitguard.defenses.detectors import load_detector, make_detector
from logitguard.errors import LogitguardError
from logitguard.defenses.estimator import NotFittedError
from logitguard.defenses.guard import Guard
from logitguard.defenses.svm import SVMCorrector

REPO = Path(__file__).resolve().parents[1]
BLOCK_TORCH = """\
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _NoTorch())
"""


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `import torch` raises ImportError."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code), *args], capture_output=True,
                          text=True, cwd=REPO, env=env)


def small_corrector(table) -> LogitCorrector:
    return LogitCorrector(hidden=48, epochs=3, batch_size=64, progress=False).fit_table(table, "fgsm")


@pytest.fixture(scope="module")
def saved(digits_table, tmp_path_factory):
    """A corrector, an SVM, two detectors and a guard fitted with torch and saved; their torch-side outputs."""
    out = tmp_path_factory.mktemp("light")
    table = digits_table
    corrector = small_corrector(table)
    svm = SVMCorrector(method="exact").fit_table(table, "fgsm")
    learned = make_detector("learned-noisy", seed=0).fit_table(table, attacks=["fgsm"])
    odds = make_detector("odds").fit_table(table, attacks=["fgsm"])
    guard = Guard(GatedDefense(learned, corrector, on_flag="correct"), class_names=table.class_names,
                  num_queries=table.noisy_logits.shape[1])
    paths = {"corrector": corrector.save(out / "corrector.npz"), "svm": svm.save(out / "svm.npz"),
             "learned": learned.save(out / "learned.npz"), "odds": odds.save(out / "odds.npz"),
             "guard": guard.save(out / "guard.npz")}
    np.savez(out / "input.npz", logits=table.logits, noisy=table.noisy_logits)
    decision = guard.check(table.logits, table.noisy_logits)
    expected = {"corrected": corrector.correct(table.logits), "svm": svm.predict(table.logits),
                "learned": learned.score_samples(table.logits, table.noisy_logits),
                "odds": odds.score_samples(table.logits, table.noisy_logits),
                "guard_label": decision.label, "guard_flagged": decision.flagged}
    return out, {k: str(v) for k, v in paths.items()}, expected


APPLY = """
    import json, sys
    import numpy as np
    from logitguard.defenses.estimator import load_estimator
    from logitguard.defenses.guard import Guard

    out, paths = sys.argv[1], json.loads(sys.argv[2])
    data = np.load(out + "/input.npz")
    logits, noisy = data["logits"], data["noisy"]
    corrector, svm = load_estimator(paths["corrector"]), load_estimator(paths["svm"])
    learned, odds = load_estimator(paths["learned"]), load_estimator(paths["odds"])
    decision = Guard.load(paths["guard"]).check(logits, noisy)
    np.savez(out + "/light.npz", corrected=corrector.correct(logits), svm=svm.predict(logits),
             learned=learned.score_samples(logits, noisy), odds=odds.score_samples(logits, noisy),
             guard_label=decision.label, guard_flagged=decision.flagged)
    assert "torch" not in sys.modules, "torch was imported"
"""


def test_saved_defenses_apply_without_torch_and_match(saved):
    out, paths, expected = saved
    result = run_without_torch(APPLY, str(out), json.dumps(paths))
    assert result.returncode == 0, result.stderr
    light = np.load(out / "light.npz")
    np.testing.assert_allclose(light["corrected"], expected["corrected"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(light["corrected"].argmax(axis=1), expected["corrected"].argmax(axis=1))
    np.testing.assert_array_equal(light["svm"], expected["svm"])
    np.testing.assert_allclose(light["learned"], expected["learned"], rtol=1e-12)
    np.testing.assert_allclose(light["odds"], expected["odds"], rtol=1e-12)
    np.testing.assert_array_equal(light["guard_label"], expected["guard_label"])
    np.testing.assert_array_equal(light["guard_flagged"], expected["guard_flagged"])


CLI = """
    import sys
    from logitguard.cli import main
    try:
        main(sys.argv[1:], prog_name="logitguard")
    finally:
        assert "torch" not in sys.modules, "torch was imported"
"""


def test_defend_and_guard_apply_cli_without_torch(saved, digits_table, tmp_path):
    out, paths, expected = saved
    table = tmp_path / "table.parquet"
    write_table(digits_table, table)
    result = run_without_torch(CLI, "defend", str(table), "--detector", paths["odds"], "--corrector",
                               paths["corrector"], "--out", str(tmp_path / "defended.parquet"))
    assert result.returncode == 0, result.stderr
    gated = GatedDefense(load_detector(paths["odds"]), LogitCorrector.load(paths["corrector"]), on_flag="correct")
    want = gated.check(digits_table.logits, digits_table.noisy_logits).label
    defended = read_table(tmp_path / "defended.parquet")
    np.testing.assert_array_equal(defended.column("pred"), want)

    result = run_without_torch(CLI, "guard", "apply", str(table), "--guard", paths["guard"],
                               "--out", str(tmp_path / "guarded.parquet"))
    assert result.returncode == 0, result.stderr
    guarded = read_table(tmp_path / "guarded.parquet")
    np.testing.assert_array_equal(guarded.column("pred"), expected["guard_label"])


def test_help_and_cli_import_pull_in_no_torch():
    result = run_without_torch(CLI, "--help")
    assert result.returncode == 0, result.stderr
    assert "guard" in result.stdout and "train-corrector" in result.stdout
    code = "import sys, logitguard, logitguard.cli; print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"  # torch is really installed here, so this checks the imports themselves


def test_training_and_legacy_files_say_torch_is_needed(digits_table, tmp_path):
    code = """
        import sys
        from logitguard.defenses.corrector import LogitCorrector
        from logitguard.errors import LogitguardError
        for action in (lambda: LogitCorrector(hidden=4, epochs=1).fit_table(read(), "fgsm"),
                       lambda: __import__("logitguard.explain"),
                       lambda: LogitCorrector.load(sys.argv[1])):
            try:
                action()
            except LogitguardError as exc:
                print("refused:", exc)
        """
    table = tmp_path / "t.parquet"
    write_table(digits_table, table)
    code = "from logitguard import read_table\nread = lambda: read_table(sys.argv[2])\n" + textwrap.dedent(code)
    result = run_without_torch(code, str(REPO / "tests/data/legacy-defenses/corrector-pgd.pt"), str(table))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all("needs torch" in line and "logitguard[train]" in line for line in lines)
    assert "legacy torch .pt format" in lines[2] and ".npz" in lines[2]
    # produce needs torch for every command
    produce = run_without_torch("from producers.cli import main; main(['train', '--dataset', 'digits', '--out', "
                                "'x'], prog_name='logitguard-produce')")
    assert produce.returncode != 0 and "Error: logitguard-produce needs torch" in produce.stderr


def test_legacy_corrector_resaved_as_npz_matches(tmp_path):
    legacy = LogitCorrector.load(REPO / "tests/data/legacy-defenses/corrector-pgd.pt")  # read with torch (weights_only)
    assert "_model" not in vars(legacy)  # loaded as arrays: the NumPy path
    resaved = LogitCorrector.load(legacy.save(tmp_path / "corrector-pgd.npz"))
    logits = np.random.default_rng(0).normal(0, 5, (300, legacy.n_classes_)).astype(np.float32)
    np.testing.assert_array_equal(resaved.correct(logits), legacy.correct(logits))
    torch_out = legacy.model_(__import__("torch").from_numpy(logits)).detach().numpy()  # builds the torch module
    np.testing.assert_allclose(legacy.correct(logits), torch_out, rtol=1e-5, atol=1e-4)


def test_numpy_forward_equals_torch_forward_and_model_assignment(digits_table, tmp_path):
    import torch

    trained = small_corrector(digits_table)
    assert "_model" in vars(trained)  # after fit the torch module is the truth
    loaded = LogitCorrector.load(trained.save(tmp_path / "c.npz"))
    assert sorted(loaded.weights_) == sorted(WEIGHT_KEYS) and loaded.weights_["0.weight"].shape == (48, 10)
    logits = np.concatenate([digits_table.logits] * 3)  # several NumPy batches
    np.testing.assert_allclose(loaded.correct(logits), trained.correct(logits), rtol=1e-5, atol=1e-5)
    # setting model_ replaces the weights: correct() then runs that module
    with torch.no_grad():
        loaded.model_ = torch.nn.Sequential(torch.nn.Linear(10, 10)).eval()
        loaded.model_[0].weight.copy_(torch.eye(10))
        loaded.model_[0].bias.zero_()
    np.testing.assert_allclose(loaded.correct(digits_table.logits), digits_table.logits, rtol=1e-6)
    assert "_weights" not in vars(loaded)
    with pytest.raises(NotFittedError):
        LogitCorrector().correct(digits_table.logits)


def test_damaged_weights_are_refused(digits_table, tmp_path):
    corrector = small_corrector(digits_table)
    header, arrays = corrector.to_arrays()
    from logitguard.defenses.estimator import from_arrays

    with pytest.raises(LogitguardError, match="weights do not fit"):
        from_arrays(header, {**arrays, "0.weight": arrays["0.weight"][:5]}, "test")
    with pytest.raises(LogitguardError, match="weights do not fit"):
        from_arrays(header, {k: v for k, v in arrays.items() if k != "3.bias"}, "test")


def test_cli_mirrors_the_corrector_defaults():
    from logitguard.cli.options import CORRECTOR_DEFAULTS

    defaults = LogitCorrector.__init__.__kwdefaults__
    assert CORRECTOR_DEFAULTS == {k: defaults[k] for k in CORRECTOR_DEFAULTS}
    assert set(defaults) - set(CORRECTOR_DEFAULTS) == {"device", "progress"}
