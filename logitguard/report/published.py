"""The seed papers' published figures, quoted in the demo report's **Reference** blocks beside ours.

The figures are read at run time from ``seed-figures.json`` (transcribed from the seed papers; the shared
folder ``../shared/reference/`` beside the checkout, or an explicit path). Each block names the paper, the
table and its setting (dataset, model, attack): they are the seeds' figures, never ours, and not the same
experiment. A figure missing from the file is left out; a missing file gives a block saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import LogitguardError

REFERENCE_FILE = "seed-figures.json"
REFERENCE_ENV = "LOGITGUARD_REFERENCE"
SECTIONS = ("threat", "correction", "transfer", "p_clean", "detection", "gated", "supporting", "bhattacharyya",
            "model_side")

__all__ = ["REFERENCE_FILE", "SECTIONS", "find_reference", "load_reference", "reference_block"]


def find_reference(path: str | os.PathLike | None = None) -> Path | None:
    """The seed-figures file: `path` when given (a file or a folder holding it), else ``$LOGITGUARD_REFERENCE``,
    else ``shared/reference/seed-figures.json`` in the nearest folder above the checkout that has one
    (``../shared`` of the repository, also from a git worktree one level deeper). None when not found."""
    given = path if path is not None else os.environ.get(REFERENCE_ENV)
    if given:
        given = Path(given)
        given = given / REFERENCE_FILE if given.is_dir() else given
        return given if given.is_file() else None
    root = Path(__file__).resolve().parents[2]
    for folder in root.parents:
        candidate = folder / "shared" / "reference" / REFERENCE_FILE
        if candidate.is_file():
            return candidate
    return None


def load_reference(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The seed figures (`find_reference`) as a dict; ``{}`` when no file is found. `LogitguardError` when the
    file is there but is not a JSON object."""
    found = find_reference(path)
    if found is None:
        return {}
    try:
        data = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LogitguardError(f"{found}: cannot read the seeds' reference figures: {exc}") from None
    if not isinstance(data, dict):
        raise LogitguardError(f"{found}: the seeds' reference figures must be a JSON object")
    return {**data, "_path": str(found)}


def reference_block(section: str, reference: Mapping[str, Any]) -> str:
    """Markdown: the **Reference** block of report `section` (one of `SECTIONS`), quoting the seeds' figures
    with their setting."""
    if not reference:
        return ("**Reference** (seed papers): the seeds' published figures were not found (looked for "
                f"`shared/reference/{REFERENCE_FILE}` above the checkout; give `--reference`).")
    items = [item for item in (make(reference) for make in _QUOTES[section]) if item]
    if not items:
        return f"**Reference** (seed papers): `{REFERENCE_FILE}` has no figure for this section."
    lines = ["**Reference** (the seed papers' published figures, not ours; their setting differs from ours: "
             "compare directions and orders of magnitude, not digits):", ""]
    return "\n".join(lines + [f"- {item}" for item in items])


# ---------------------------------------------------------------------------------------------


def _get(data: Mapping[str, Any], path: str) -> Any:
    """``data["a"]["b"]`` for ``"a/b"``; None when any step is missing."""
    for key in path.split("/"):
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%"


def _quote(paper: str, where: str, setting: str, figures: str) -> str:
    return f"{paper}, {where} ({setting}): {figures}"


def _li_table1(ref: Mapping[str, Any]) -> str | None:
    row = _get(ref, "li2019/table1_pgd/resnet50")
    if not row:
        return None
    return _quote("Li et al. 2019", "Table 1", "ILSVRC2012, ResNet-50, PGD ε=16/255, 10 steps; corrector "
                  "C→10,000→C, p_clean 0.3",
                  f"full validation set: clean {_pct(row['clean_full_none'])} → {_pct(row['clean_full_corrected'])}, "
                  f"PGD {_pct(row['pgd_full_none'])} → {_pct(row['pgd_full_corrected'])}; selected set (1,000 "
                  f"images): clean {_pct(row['clean_selected_none'])} → {_pct(row['clean_selected_corrected'])}, "
                  f"PGD {_pct(row['pgd_selected_none'])} → {_pct(row['pgd_selected_corrected'])}")


def _li_table2(ref: Mapping[str, Any]) -> str | None:
    table = _get(ref, "li2019/table2_resnet50_selected")
    if not table:
        return None
    cells = [f"{name} {_pct(r['adv_none'])} → {_pct(r['adv_corrected'])} (clean → {_pct(r['clean_corrected'])})"
             for name, r in table.items()]
    return _quote("Li et al. 2019", "Table 2", "ILSVRC2012, ResNet-50, selected set, each attack's own corrector",
                  "attacked accuracy none → corrected: " + "; ".join(cells))


def _li_table3(ref: Mapping[str, Any]) -> str | None:
    table = _get(ref, "li2019/table3_transfer_resnet50_selected")
    if not table:
        return None
    rows, cols, acc = table["rows_evaluated_on"], table["columns_trained_on"], table["accuracy"]
    cells = [f"{cols[j]}→{rows[i]} {_pct(acc[i][j])}" for i in range(len(rows)) for j in range(len(cols)) if i != j]
    own = ", ".join(f"{rows[i]} {_pct(acc[i][i])}" for i in range(len(rows)))
    return _quote("Li et al. 2019", "Table 3", "ILSVRC2012, ResNet-50, selected set; trained on → evaluated on",
                  f"own attack {own}; across attacks " + ", ".join(cells))


def _li_p_clean(ref: Mapping[str, Any]) -> str | None:
    row = _get(ref, "li2019/table2_resnet50_selected/pgd")
    if not row:
        return None
    return _quote("Li et al. 2019", "Table 2", "ILSVRC2012, ResNet-50, PGD, selected set; one setting, p_clean 0.3, "
                  "no sweep published", f"clean {_pct(row['clean_none'])} → {_pct(row['clean_corrected'])}, PGD "
                  f"{_pct(row['adv_none'])} → {_pct(row['adv_corrected'])}")


def _li_layers(ref: Mapping[str, Any]) -> str | None:
    row = _get(ref, "li2019/single_layer_vs_two_layer_pgd_resnet50")
    if not row:
        return None
    return _quote("Li et al. 2019", "§4.2", "ILSVRC2012, ResNet-50, PGD",
                  f"a corrector with one hidden layer recovers {_pct(row['two_layer'])}, one without "
                  f"{_pct(row['single_layer'])}")


def _li_ablation(ref: Mapping[str, Any]) -> str | None:
    delta = _get(ref, "li2019/ablation_delta")
    if delta is None:
        return None
    return _quote("Li et al. 2019", "§5.2", "ILSVRC2012, ResNet-50, PGD", f"lowering the supporting classes' logits "
                  f"by δ = {delta} makes the correction fail on almost every image (no figure published)")


def _li_bhattacharyya(ref: Mapping[str, Any]) -> str | None:
    bc = _get(ref, "li2019/bhattacharyya")
    if not bc:
        return None
    return _quote("Li et al. 2019", "§5.2", "ILSVRC2012, ResNet-50, top-10 supporting classes",
                  "Bhattacharyya coefficients " + ", ".join(f"{k} {v:.4f}" for k, v in bc.items())
                  + "; the most similar pairs transfer best (their Table 3)")


def _pang_auc(ref: Mapping[str, Any]) -> str | None:
    table = _get(ref, "pang2018/table2_auc_x100_resnet32")
    if not table:
        return None
    cols = table["columns"]
    pick = [f"{attack.split('_')[0].upper()} ({attack.split('_')[1].upper()}): "
            + ", ".join(f"{c.split('_', 1)[1]} {v:g}" for c, v in zip(cols, table[attack]) if c.startswith("mnist_"))
            for attack in ("bim_ce", "bim_rce", "cw-hc_ce") if attack in table]
    return _quote("Pang et al. 2018", "Table 2", "MNIST, ResNet-32, AUROC ×100, oblivious attacks",
                  "; ".join(pick))


def _pang_whitebox(ref: Mapping[str, Any]) -> str | None:
    table = _get(ref, "pang2018/table3_whitebox_cw_wb")
    if not table:
        return None
    return _quote("Pang et al. 2018", "Table 3", "ResNet-32, white-box C&W-wb aimed at K-density",
                  "share of attacks that do not fool the detector: " + ", ".join(
                      f"{k.replace('_', ' ').upper()} {v['ratio_not_fooled']:.2f}" for k, v in table.items()))


def _pang_error(ref: Mapping[str, Any]) -> str | None:
    table = _get(ref, "pang2018/table1_test_error_pct")
    if not table:
        return None
    cols = " / ".join(table.get("columns", []))
    return _quote("Pang et al. 2018", "Table 1", f"test error %, {cols}", ", ".join(
        f"{k.replace('_', ' ').upper()} {' / '.join(f'{v:g}' for v in vals)}" for k, vals in table.items()
        if k != "columns"))


def _martin_odds(ref: Mapping[str, Any]) -> str | None:
    rate = _get(ref, "martin2019/odds_test_detection_rate_mnist")
    if rate is None:
        return None
    tau = _get(ref, "martin2019/odds_test_threshold_tau")
    return _quote("Martin 2019", "§9.3", "MNIST, 4-conv CNN, ART attacks" + (f", odds test τ = {tau}" if tau else ""),
                  f"the odds test detects about {_pct(rate)} of adversarial examples")


def _martin_svm(ref: Mapping[str, Any]) -> str | None:
    low_high = _get(ref, "martin2019/detect_then_svm_bim_accuracy_range")
    if not low_high:
        return None
    return _quote("Martin 2019", "§9.3, Fig. 14", "MNIST, BIM over the whole L2 range; oblivious",
                  f"odds test → SVM keeps {_pct(low_high[0])}–{_pct(low_high[1])} accuracy, 0% without defense "
                  "at L2 = 5")


def _martin_at(ref: Mapping[str, Any]) -> str | None:
    at = _get(ref, "martin2019/pgd_adversarial_training")
    if not at:
        return None
    return _quote("Martin 2019", "§9.1", f"MNIST, PGD adversarial training, {at['steps']} steps, ε = {at['eps']}",
                  f"clean accuracy {_pct(at['clean_accuracy'])}")


def _gred_detect(ref: Mapping[str, Any]) -> str | None:
    rate = _get(ref, "gred/detection_rate_claim")
    if rate is None:
        return None
    return _quote("GRED (Li, Wang, Wu, Zhou)", "abstract", "MNIST, CIFAR-10, ImageNet subset, VGG11; grey-box",
                  f"detection rate over {_pct(rate)} against most attacks")


def _gred_whitebox(ref: Mapping[str, Any]) -> str | None:
    table = _get(ref, "gred/table4_untargeted_whitebox_success_with_gred")
    if not table:
        return None
    return _quote("GRED", "Table 4", "VGG11, untargeted white-box attacks on the detector-guarded model",
                  "attack success " + "; ".join(f"{data} " + ", ".join(f"{a.upper()} {v:.3f}" for a, v in row.items())
                                                for data, row in table.items()))


def _gred_rectifier(ref: Mapping[str, Any]) -> str | None:
    all_adv = _get(ref, "gred/table7_rectifier_all_adversarial_range")
    mixed = _get(ref, "gred/table7_end_to_end_mixed_range")
    if not all_adv:
        return None
    text = "rectifier on adversarial inputs " + ", ".join(f"{k} {v[0]:.3f}–{v[1]:.3f}" for k, v in all_adv.items())
    if mixed:
        text += "; end to end on 50% benign / 50% adversarial " + ", ".join(
            f"{k} {v[0]:.3f}–{v[1]:.3f}" for k, v in mixed.items())
    return _quote("GRED", "Table 7", "VGG11, grey-box (the attacker ignores the detector)", text)


def _at_alp(ref: Mapping[str, Any]) -> str | None:
    row = _get(ref, "at_alp/flowers17_pgd200")
    if not row:
        return None
    return _quote("AT + ALP", "results", "17 Flower Category Database, 200-step PGD, ε ∈ {0.25, 0.5}",
                  f"robust accuracy grey-box {_pct(row['at_alp_greybox'])}, black-box {_pct(row['at_alp_blackbox'])} "
                  f"against prior art's {_pct(row['prior_art_greybox'])} and {_pct(row['prior_art_blackbox'])}")


_QUOTES: dict[str, tuple[Callable[[Mapping[str, Any]], str | None], ...]] = {
    "threat": (_pang_whitebox, _gred_whitebox, _at_alp),
    "correction": (_li_table1, _li_table2),
    "transfer": (_li_table3,),
    "p_clean": (_li_p_clean,),
    "detection": (_pang_auc, _martin_odds, _gred_detect),
    "gated": (_martin_svm, _gred_rectifier),
    "supporting": (_li_ablation, _li_layers),
    "bhattacharyya": (_li_bhattacharyya,),
    "model_side": (_pang_error, _pang_whitebox, _martin_at, _at_alp, _gred_rectifier),
}
