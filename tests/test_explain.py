"""Supporting classes, ablation and Bhattacharyya transfer analysis on real digits logits."""

from __future__ import annotations

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from logitguard import LogitguardError
from logitguard.defenses.corrector import LogitCorrector
from logitguard.explain import (
    ablation,
    bhattacharyya,
    bhattacharyya_matrix,
    default_k,
    instance_view,
    mean_logit_counts,
    rank_agreement,
    supporting_frequencies,
    supporting_scores,
    top_classes_per_attack,
    top_supporting,
)

FAST = dict(hidden=256, epochs=40, lr=1e-3, progress=False)
NAMES = [f"digit-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def table(digits_test):
    return digits_test


@pytest.fixture(scope="module")
def corrector(digits_train):
    return LogitCorrector(**FAST).fit_table(digits_train, "fgsm")


@pytest.fixture(scope="module")
def fgsm_rows(table):
    return table.select(split="test", attacks="fgsm")


def _objective(net: nn.Module, z: np.ndarray, label: int) -> np.ndarray:
    """g(z)_i − mean_l g(z)_l for each row of z (float64 network)."""
    with torch.no_grad():
        out = net(torch.from_numpy(z)).numpy()
    return out[:, label] - out.mean(axis=1)


def test_closed_form_matches_autograd(corrector, fgsm_rows):
    z, y = fgsm_rows.logits, fgsm_rows.labels
    net64 = copy.deepcopy(corrector.model_).double()
    closed = supporting_scores(net64, z, y, batch_size=100)  # several batches, a ragged last one
    auto = supporting_scores(net64, z, y, method="autograd")
    assert closed.shape == z.shape and closed.dtype == np.float64
    np.testing.assert_allclose(closed, auto, rtol=0, atol=1e-5)
    # The fitted corrector itself (float32) agrees too, and is left in eval mode.
    closed32 = supporting_scores(corrector, z, y)
    assert closed32.dtype == np.float32 and not corrector.model_.training
    np.testing.assert_allclose(closed32, closed, rtol=0, atol=1e-5)
    np.testing.assert_allclose(supporting_scores(corrector, z, y, method="autograd"), closed, rtol=0, atol=1e-5)


def test_scores_match_a_finite_difference_jacobian(corrector, fgsm_rows):
    net64 = copy.deepcopy(corrector.model_).double().eval()
    z, y = fgsm_rows.logits.astype(np.float64), fgsm_rows.labels
    scores = supporting_scores(net64, z, y)
    eps = 1e-6
    for n in (0, 17, 200):
        steps = eps * np.eye(10)
        numeric = (_objective(net64, z[n] + steps, y[n]) - _objective(net64, z[n] - steps, y[n])) / (2 * eps)
        np.testing.assert_allclose(scores[n], numeric, rtol=0, atol=1e-6)


def test_autograd_takes_any_module_and_closed_form_refuses_it():
    torch.manual_seed(0)
    linear = nn.Linear(4, 4).double()  # g(z) = A z + b: S = A[i] − mean_l A[l] for every z
    z = np.random.default_rng(0).normal(size=(5, 4))
    y = np.array([0, 1, 2, 3, 1])
    a = linear.weight.detach().numpy()
    np.testing.assert_allclose(supporting_scores(linear, z, y, method="autograd"), a[y] - a.mean(0), atol=1e-12)
    message = ("method='closed_form' needs the network Linear -> ReLU -> Linear (dropout allowed); "
               "use method='autograd' for Linear")
    with pytest.raises(LogitguardError, match=f"^{re.escape(message)}$"):
        supporting_scores(linear, z, y)


def test_top_supporting_orders_by_score_and_leaves_out_the_true_class():
    assert [default_k(c) for c in (2, 10, 30, 100, 1000)] == [1, 3, 10, 10, 10]
    scores = np.array([[0.1, 0.9, 0.5, 0.7, -1.0], [3.0, 2.0, 1.0, 0.0, 4.0]])
    np.testing.assert_array_equal(top_supporting(scores, 3), [[1, 3, 2], [4, 0, 1]])
    np.testing.assert_array_equal(top_supporting(scores, 2, labels=np.array([1, 0])), [[3, 2], [4, 1]])
    assert top_supporting(np.random.default_rng(0).normal(size=(7, 10))).shape == (7, 3)


def test_frequencies_are_distributions_over_class_names(corrector, table):
    freqs = supporting_frequencies(corrector, table)
    assert list(freqs.index) == NAMES and list(freqs.columns) == ["bim", "fgsm"]
    np.testing.assert_allclose(freqs.sum(axis=0), 1.0)
    # Each entry is (rows with the class in their top 3) / (rows × 3), the true class left out.
    rows = table.select(split="test", attacks="fgsm")
    top = top_supporting(supporting_scores(corrector, rows.logits, rows.labels), 3, labels=rows.labels)
    np.testing.assert_allclose(freqs["fgsm"], np.bincount(top.ravel(), minlength=10) / (len(rows) * 3))
    assert not (top == rows.labels[:, None]).any()
    leaders = top_classes_per_attack(freqs, n=2)
    assert set(leaders) == {"bim", "fgsm"}
    assert leaders["fgsm"] == list(freqs["fgsm"].sort_values(ascending=False).index[:2])


def test_instance_view_lists_one_rows_top_scores(corrector, fgsm_rows):
    z, label = fgsm_rows.logits[3], int(fgsm_rows.labels[3])
    view = instance_view(corrector, z, label, k=4)
    scores = supporting_scores(corrector, z[None], np.array([label]))[0]
    assert isinstance(view, pd.Series) and len(view) == 4 and NAMES[label] not in view.index
    assert view.is_monotonic_decreasing
    np.testing.assert_array_equal(view.to_numpy(), scores[[NAMES.index(c) for c in view.index]])
    assert instance_view(corrector, z, label, include_true=True).index[0] == NAMES[label]  # as on most rows


def test_lowering_supporting_classes_hurts_more_than_lowering_random_ones(corrector, table):
    # Measured on this data (fgsm and bim, corrector seeds 0-2): ~0.54 before; supporting classes
    # lowered by 5 -> ~0.1-0.2 (by 20 -> 0.0); k random classes -> ~0.46 (by 20 -> ~0.25).
    for delta in (5.0, 20.0):
        result = ablation(corrector, table, "fgsm", delta=delta)
        assert result["rows"] == 397 and result["k"] == 3
        assert result["accuracy"] > 0.45
        assert result["accuracy_supporting_lowered"] < result["accuracy_random_lowered"] - 0.15
        assert result["accuracy_random_lowered"] <= result["accuracy"] + 0.02
    assert result["true_in_top_k"] > 0.9  # why the true class is left out of both
    assert ablation(corrector, table, "bim", seed=1) == ablation(corrector, table, "bim", seed=1)


def test_bhattacharyya_of_same_and_disjoint_distributions():
    assert bhattacharyya([0.2, 0.3, 0.5], [2, 3, 5]) == pytest.approx(1.0)  # inputs are normalised
    assert bhattacharyya([1, 1, 0, 0], [0, 0, 3, 1]) == 0.0
    assert bhattacharyya([1, 0], [1, 1]) == pytest.approx(np.sqrt(0.5))
    freqs = pd.DataFrame({"a": [1, 1, 0], "b": [0, 1, 1], "c": [0, 0, 5]}, index=["x", "y", "z"])
    bc = bhattacharyya_matrix(freqs)
    assert list(bc.index) == list(bc.columns) == ["a", "b", "c"]
    np.testing.assert_array_equal(bc.to_numpy(), bc.to_numpy().T)
    np.testing.assert_array_equal(np.diag(bc), 1.0)
    assert bc.at["a", "b"] == pytest.approx(bhattacharyya(freqs["a"], freqs["b"])) == pytest.approx(0.5)
    assert bc.at["a", "c"] == 0.0


def test_bhattacharyya_matrix_of_real_frequencies(corrector, table):
    bc = bhattacharyya_matrix(supporting_frequencies(corrector, table))
    assert bc.shape == (2, 2) and 0.0 <= bc.at["fgsm", "bim"] == bc.at["bim", "fgsm"] <= 1.0


def test_rank_agreement_on_known_answers():
    names = ["clean", "a", "b", "c"]
    bc = pd.DataFrame([[1, 0.9, 0.5], [0.9, 1, 0.2], [0.5, 0.2, 1]], index=names[1:], columns=names[1:])
    transfer = pd.DataFrame(np.nan, index=pd.Index(names, name="evaluated on"),
                            columns=pd.Index(names[1:], name="trained on"))
    for a in names[1:]:
        for b in names[1:]:
            transfer.at[a, b] = 0.3 + 0.5 * bc.at[a, b] ** 2  # strictly increasing in bc
    transfer.loc["clean"] = 0.0  # ignored
    agreement = rank_agreement(bc, transfer)
    assert agreement["spearman"] == pytest.approx(1.0) and agreement["pairs"] == 6
    assert 0.0 <= agreement["p_value"] <= 1.0
    assert rank_agreement(bc, 1 - transfer)["spearman"] == pytest.approx(-1.0)
    with pytest.raises(LogitguardError, match=re.escape("needs at least 3 off-diagonal attack pairs")):
        rank_agreement(bc.loc[["a", "b"], ["a", "b"]], transfer)


def test_mean_logit_counts_count_every_row(table):
    hist = mean_logit_counts(table, bins=12)
    assert list(hist.columns) == ["clean", "bim", "fgsm"] and len(hist) == 12
    assert (hist.sum(axis=0) == 397).all()
    edges = hist.attrs["bin_edges"]
    np.testing.assert_allclose(hist.index, (edges[:-1] + edges[1:]) / 2)


@pytest.mark.parametrize("call, message", [
    (lambda c, t: supporting_frequencies(c, t, ["pgd"]),
     "no rows for attack(s) ['pgd'] in this table; it has ['bim', 'fgsm']"),
    (lambda c, t: supporting_scores(LogitCorrector(), np.zeros((2, 10)), [0, 1]),
     "this LogitCorrector is not fitted yet; call fit() or load() first"),
    (lambda c, t: supporting_scores(c, np.zeros((2, 3)), [0, 1]), "logits have 3 classes; the corrector maps 10"),
    (lambda c, t: supporting_scores(c, np.zeros((2, 3)), [0, 1], method="autograd"),
     "logits have 3 classes; the corrector maps 10"),
    (lambda c, t: supporting_scores(c, np.zeros((2, 10)), [0, 10]),
     "labels must lie in [0, 10); every row needs its true label"),
    (lambda c, t: ablation(c, t, "fgsm", k=10),
     "k must be in [1, 9] for 10 classes (the true class is left out), got 10"),
    (lambda c, t: bhattacharyya([0.5, -0.1], [1, 1]), "p must hold non-negative finite values"),
    (lambda c, t: bhattacharyya([1, 1], [1, 1, 1]), "p has 2 entries and q has 3; they must cover the same classes"),
    (lambda c, t: bhattacharyya([], []), "p must be a non-empty 1-D distribution, got shape (0,)"),
])
def test_bad_inputs_are_refused(corrector, table, call, message):
    with pytest.raises(LogitguardError, match=f"^{re.escape(message)}$"):
        call(corrector, table)
