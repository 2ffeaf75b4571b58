"""Why the corrector decides as it does: supporting classes (seed §5, App. B) and attack similarity.

For an attacked row z* with true label i, the *supporting score* of class k is how much raising z_k
raises the corrected true-class logit relative to the corrected logits' mean:

    S_k = ∂g(z*)_i/∂z_k − (1/C) Σ_l ∂g(z*)_l/∂z_k,

with g the corrector network in eval mode (dropout off). For the two-layer ReLU corrector the
Jacobian is J = W2 diag(m) W1 with m = 1[W1 z + b1 > 0], so a batch of score rows is one masked
matrix product, ((W2[i] − mean_l W2[l]) ⊙ m) @ W1, with no per-sample Jacobian; any other
differentiable row-wise module goes through one batched vector-Jacobian product.

The *supporting classes* of a row are its k classes of largest S_k other than the true class. On
real data the true class itself nearly always scores highest (on the digits fixture it is first in
~80% of rows and in the top 3 in ~98%), so keeping it would make every "supporting" distribution
mirror the label distribution and every ablation trivially lower the true logit.

Frequencies of supporting classes per attack are compared with the Bhattacharyya coefficient; whether
that similarity predicts how well a corrector trained on one attack transfers to another is
`rank_agreement`. Nothing here plots: the functions return arrays, dicts and DataFrames.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import LogitguardError

try:  # explaining a corrector differentiates its network: torch is needed here (the `train` extra)
    import torch
    from torch import nn
except ImportError:
    raise LogitguardError("explaining a corrector needs torch, which is not installed: "
                          "pip install 'logitguard[train]'") from None

from ..defenses._corrector_net import FastDropout
from ..defenses.corrector import LogitCorrector
from ..evaluation.evaluate import select_attacks
from ..tables import CLEAN, LogitTable

Method = Literal["closed_form", "autograd"]
_BATCH = 1024


# ---------------------------------------------------------------------------------------------
# Supporting scores


def supporting_scores(
    corrector: LogitCorrector | nn.Module,
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    method: Method = "closed_form",
    batch_size: int = _BATCH,
) -> np.ndarray:
    """Supporting scores S of shape (N, C) for logits (N, C) with true labels (N,).

    `corrector` is a fitted `LogitCorrector` or a bare torch module mapping (B, C) to (B, C) row by
    row. ``method="closed_form"`` needs the Linear → ReLU → (dropout) → Linear network of
    `LogitCorrector`; ``"autograd"`` takes any differentiable module. Scores are computed in the
    module's parameter dtype (pass a ``.double()`` copy for float64) and returned as NumPy.
    """
    if method not in ("closed_form", "autograd"):
        raise LogitguardError(f"method must be 'closed_form' or 'autograd', got {method!r}")
    if batch_size < 1:
        raise LogitguardError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    net = _network(corrector)
    layers = _two_layer(net)
    if method == "closed_form" and layers is None:
        raise LogitguardError(
            f"method='closed_form' needs the network Linear -> ReLU -> Linear (dropout allowed); "
            f"use method='autograd' for {type(net).__name__}"
        )
    num_classes = getattr(corrector, "n_classes_", None) or (layers[0].in_features if layers else None)
    logits, labels = _check_rows(logits, labels, num_classes)
    if method == "closed_form":
        return _closed_form(*layers, logits, labels, batch_size)
    return _autograd(net, logits, labels, batch_size)


def _closed_form(first: nn.Linear, second: nn.Linear, logits: np.ndarray, labels: np.ndarray,
                 batch_size: int) -> np.ndarray:
    dtype, device = first.weight.dtype, first.weight.device
    parts = []
    with torch.inference_mode():
        w1, b1 = first.weight, first.bias  # (D, C), (D,)
        centred = second.weight - second.weight.mean(dim=0, keepdim=True)  # row i: W2[i] − mean_l W2[l], (C, D)
        for z, y in _batches(logits, labels, batch_size, dtype, device):
            hidden = z @ w1.T if b1 is None else torch.addmm(b1, z, w1.T)
            # In place: ReLU' = 1[h > 0] (as torch's backward), times each row's W2[i] − mean W2.
            weights = hidden.gt_(0).mul_(centred[y])
            parts.append(_to_numpy(weights @ w1))
    return np.concatenate(parts)


def _autograd(net: nn.Module, logits: np.ndarray, labels: np.ndarray, batch_size: int) -> np.ndarray:
    # Rows are independent, so one vector-Jacobian product with v_n = onehot(i_n) − 1/C gives every S row.
    dtype, device = _dtype_device(net)
    parts = []
    num_classes = logits.shape[1]
    with _eval_mode(net), torch.enable_grad():
        for z, y in _batches(logits, labels, batch_size, dtype, device):
            z.requires_grad_(True)
            try:
                corrected = net(z)
            except RuntimeError as exc:
                raise LogitguardError(f"the module cannot take logits of shape {tuple(z.shape)}: {exc}") from None
            if corrected.shape != z.shape:
                raise LogitguardError(f"the module maps logits {tuple(z.shape)} to {tuple(corrected.shape)}; "
                                      "it must return one row of C logits per input row")
            v = torch.full_like(corrected, -1.0 / num_classes)
            v[torch.arange(len(y), device=device), y] += 1.0
            (grad,) = torch.autograd.grad(corrected, z, grad_outputs=v)
            parts.append(_to_numpy(grad))
    return np.concatenate(parts)


def default_k(num_classes: int) -> int:
    """Supporting classes kept per row: a third of the classes, at least 1 and at most 10.

    10 for C >= 30 (the seed's top 10 on 100- and 1000-class data), 3 for C = 10.
    """
    return int(min(10, max(1, num_classes // 3)))


def top_supporting(scores: np.ndarray, k: int | None = None, *, labels: np.ndarray | None = None) -> np.ndarray:
    """Class indices (N, k) by descending score for scores (N, C); `k` defaults to `default_k(C)`.

    With `labels` (N,), each row's true class is left out, giving the supporting classes proper.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise LogitguardError(f"scores must have shape (N, C) with N >= 1, got {scores.shape}")
    n, num_classes = scores.shape
    k = _check_k(k, num_classes, exclude_true=labels is not None)
    if labels is not None:
        labels = _check_labels(labels, n, num_classes)
        scores = scores.astype(np.float64, copy=True)
        scores[np.arange(n), labels] = -np.inf
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def instance_view(
    corrector: LogitCorrector | nn.Module,
    logits_row: np.ndarray,
    label: int,
    class_names: Sequence[str] | None = None,
    k: int | None = None,
    *,
    include_true: bool = False,
) -> pd.Series:
    """The k largest supporting scores of one row of logits (C,), indexed by class name (seed App. B).

    `class_names` defaults to the corrector's; the true class is left out unless `include_true`.
    """
    row = np.asarray(logits_row)
    if row.ndim == 2 and row.shape[0] == 1:
        row = row[0]
    if row.ndim != 1:
        raise LogitguardError(f"logits_row must have shape (C,), got {np.shape(logits_row)}")
    labels = np.array([label])
    scores = _scores(_network(corrector), row[None, :], labels)
    if class_names is None:
        class_names = getattr(corrector, "class_names_", None) or [str(c) for c in range(row.size)]
    if len(class_names) != row.size:
        raise LogitguardError(f"got {len(class_names)} class names for {row.size} classes")
    top = top_supporting(scores, k, labels=None if include_true else labels)[0]
    index = pd.Index([class_names[c] for c in top], name="class")
    return pd.Series(scores[0, top], index=index, name="supporting_score")


# ---------------------------------------------------------------------------------------------
# Per-attack frequencies and ablation


def supporting_frequencies(
    corrector: LogitCorrector | nn.Module,
    table: LogitTable,
    attacks: str | Sequence[str] | None = None,
    *,
    split: str | None = "test",
    k: int | None = None,
    include_true: bool = False,
) -> pd.DataFrame:
    """How often each class is among the top-k supporting classes of an attack's rows.

    Returns a DataFrame indexed by class name (C rows), one column per attack (default: every attack
    of `split` but clean). Entry (c, a) = (number of `a` rows with c in their top k) / (rows × k):
    the share of the attack's top-k slots that class c holds, i.e. the share of rows in which c
    appears divided by k. Each column therefore sums to 1. The true class is left out of each row's
    ranking unless `include_true`.
    """
    table, attacks = select_attacks(table, split, [attacks] if isinstance(attacks, str) else attacks)
    net = _network(corrector)
    num_classes = table.num_classes
    k = _check_k(k, num_classes, exclude_true=not include_true)
    columns = {}
    for attack in attacks:
        rows = table.select(attacks=attack)
        scores = _scores(net, rows.logits, rows.labels)
        top = top_supporting(scores, k, labels=None if include_true else rows.labels)
        columns[attack] = np.bincount(top.ravel(), minlength=num_classes) / top.size
    frame = pd.DataFrame(columns, index=pd.Index(table.class_names, name="class"))
    frame.columns.name = "attack"
    return frame


def top_classes_per_attack(freqs: pd.DataFrame, n: int = 3) -> dict[str, list[str]]:
    """The `n` most frequent supporting classes of each attack (column of `freqs`), most frequent first."""
    if n < 1:
        raise LogitguardError(f"n must be an integer >= 1, got {n!r}")
    return {str(attack): [str(c) for c in freqs[attack].nlargest(n).index] for attack in freqs.columns}


def ablation(
    corrector: LogitCorrector | nn.Module,
    table: LogitTable,
    attack: str,
    *,
    split: str | None = "test",
    k: int | None = None,
    delta: float = 20.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Corrected accuracy on `attack`'s rows before and after lowering k logits by `delta` (seed §5.2).

    Lowered per row: its top-k supporting classes, or (control) k distinct classes drawn uniformly
    with ``numpy.random.default_rng(seed)``. The true class is excluded from both: it is the top
    supporting class of most rows, so lowering it would measure nothing but the loss of its own
    logit, and the control must draw from the same candidates to be a fair baseline. How often the
    true class would otherwise be among the top k is reported as ``true_in_top_k``.

    Returns a dict: ``attack``, ``rows``, ``k``, ``delta``, ``accuracy`` (unchanged rows),
    ``accuracy_supporting_lowered``, ``accuracy_random_lowered`` and ``true_in_top_k``.
    """
    _check_delta(delta)
    table, _ = select_attacks(table, split, [attack])
    rows = table.select(attacks=attack)
    k = _check_k(k, table.num_classes, exclude_true=True)
    tally = _Tally(table.num_classes, k, delta, seed)
    tally.add(_network(corrector), rows.logits, rows.labels)
    return tally.ablation(attack)


def _check_delta(delta: float) -> None:
    if not np.isfinite(delta) or delta <= 0:
        raise LogitguardError(f"delta must be a finite number > 0, got {delta!r}")


class _Tally:
    """Counts behind one attack's supporting frequencies and `ablation`, added batch by batch.

    The control's random classes come from one generator drawing (rows, C) uniforms row after row, so rows
    added in several batches draw exactly what one call on all of them would.
    """

    def __init__(self, num_classes: int, k: int, delta: float, seed: int) -> None:
        self.k, self.delta = k, delta
        self.rng = np.random.default_rng(seed)
        self.slots = np.zeros(num_classes, dtype=np.int64)  # how often each class is a supporting class
        self.rows = 0
        self.correct = {"accuracy": 0, "accuracy_supporting_lowered": 0, "accuracy_random_lowered": 0}
        self.true_in_top_k = 0

    def add(self, net: nn.Module, logits: np.ndarray, labels: np.ndarray) -> None:
        n, num_classes = logits.shape
        k = self.k
        scores = _scores(net, logits, labels)
        supporting = top_supporting(scores, k, labels=labels)
        self.slots += np.bincount(supporting.ravel(), minlength=num_classes)
        true_rank = (scores > scores[np.arange(n), labels][:, None]).sum(axis=1)  # classes scoring above it
        self.true_in_top_k += int((true_rank < k).sum())
        del scores
        draws = self.rng.random((n, num_classes))
        draws[np.arange(n), labels] = np.inf  # never drawn: the k smallest of the rest are a uniform k-subset
        random = np.argpartition(draws, k - 1, axis=1)[:, :k]
        del draws
        for name, lowered in (("accuracy", None), ("accuracy_supporting_lowered", supporting),
                              ("accuracy_random_lowered", random)):
            z = np.array(logits)
            if lowered is not None:
                np.put_along_axis(z, lowered, np.take_along_axis(z, lowered, axis=1) - self.delta, axis=1)
            self.correct[name] += int((_forward(net, z).argmax(axis=1) == labels).sum())
        self.rows += n

    def frequencies(self) -> np.ndarray:
        return self.slots / (self.rows * self.k)

    def ablation(self, attack: str) -> dict[str, Any]:
        n = self.rows
        return {"attack": attack, "rows": int(n), "k": self.k, "delta": float(self.delta),
                **{name: count / n for name, count in self.correct.items()},
                "true_in_top_k": self.true_in_top_k / n}


def explain_path(
    corrector: LogitCorrector | nn.Module,
    path: str | os.PathLike,
    attacks: str | Sequence[str] | None = None,
    *,
    split: str | None = "test",
    k: int | None = None,
    delta: float = 20.0,
    seed: int = 0,
    batch_rows: int | None = None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """`supporting_frequencies` and one `ablation` per attack for the table at `path`, streamed in one pass.

    Returns (frequencies: classes x attacks, ablations: one dict per attack, in the frequencies' column
    order), equal to ``supporting_frequencies(corrector, read_table(path, split=split), attacks, split=None,
    k=k)`` and ``[ablation(corrector, table, a, split=None, k=k, delta=delta, seed=seed) for a in …]``.
    Memory depends on the batch size, not on the table.
    """
    from ..tables.stream import stream_batches
    from ..tables import read_keys

    _check_delta(delta)
    keys, attacks = select_attacks(read_keys(path, split=split), split,
                                   [attacks] if isinstance(attacks, str) else attacks)
    net = _network(corrector)
    num_classes = keys.num_classes
    k = _check_k(k, num_classes, exclude_true=True)
    tallies = {attack: _Tally(num_classes, k, delta, seed) for attack in attacks}
    for batch in stream_batches(path, split=split, attacks=attacks, batch_rows=batch_rows):
        for attack in dict.fromkeys(batch.attack):
            rows = batch.attack == attack
            every = rows.all()
            tallies[attack].add(net, batch.logits if every else batch.logits[rows],
                                batch.labels if every else batch.labels[rows])
    frame = pd.DataFrame({a: t.frequencies() for a, t in tallies.items()},
                         index=pd.Index(keys.class_names, name="class"))
    frame.columns.name = "attack"
    return frame, [tallies[a].ablation(a) for a in frame.columns]


# ---------------------------------------------------------------------------------------------
# Bhattacharyya similarity and transfer


def bhattacharyya(p: np.ndarray, q: np.ndarray) -> float:
    """Bhattacharyya coefficient Σ_k sqrt(p_k q_k) of two distributions (1-D, same length, positionally
    matched), each normalised to sum 1 first: 1 for equal distributions, 0 for disjoint supports."""
    p, q = _distribution(p, "p"), _distribution(q, "q")
    if p.size != q.size:
        raise LogitguardError(f"p has {p.size} entries and q has {q.size}; they must cover the same classes")
    return float(np.clip(np.sqrt(p * q).sum(), 0.0, 1.0))


def bhattacharyya_matrix(freqs: pd.DataFrame) -> pd.DataFrame:
    """Attack × attack Bhattacharyya coefficients (symmetric, diagonal 1) between the columns of
    `freqs` (classes × attacks, e.g. from `supporting_frequencies`), each column normalised first."""
    values = freqs.to_numpy(dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise LogitguardError(f"freqs must be a non-empty classes × attacks DataFrame, got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise LogitguardError("freqs must hold non-negative finite values")
    totals = values.sum(axis=0)
    if (totals <= 0).any():
        empty = [str(c) for c in freqs.columns[totals <= 0]]
        raise LogitguardError(f"columns {empty} of freqs sum to 0; a distribution needs positive mass")
    roots = np.sqrt(values / totals)
    bc = roots.T @ roots
    bc = np.clip((bc + bc.T) / 2, 0.0, 1.0)  # exact symmetry despite float rounding
    np.fill_diagonal(bc, 1.0)
    index = pd.Index(freqs.columns, name="attack")
    return pd.DataFrame(bc, index=index, columns=index.copy())


def rank_agreement(bc: pd.DataFrame, transfer: pd.DataFrame, *, relative: bool = False) -> dict[str, float | int]:
    """Does Bhattacharyya similarity predict transfer? Spearman's rho between the two over attack pairs.

    `bc` is attack × attack (`bhattacharyya_matrix`); `transfer` is `evaluate.transfer_matrix`'s
    accuracy, rows = evaluated on, columns = trained on (its "clean" row is ignored). Every ordered
    pair (a evaluated on, b trained on), a ≠ b, of attacks present in both matrices is one point
    (bc[a, b], transfer[a, b]); pairs with a missing value are dropped. With ``relative=True`` the
    transfer is divided by transfer[a, a] (the accuracy of a's own corrector), which removes how hard
    attack a is from the comparison. A rho near 1 means: the more alike two attacks' supporting
    classes, the better a corrector for one defends against the other.

    Returns ``{"spearman": rho, "p_value": p, "pairs": n}``.
    """
    from scipy.stats import spearmanr

    attacks = [a for a in bc.index
               if a != CLEAN and a in bc.columns and a in transfer.index and a in transfer.columns]
    x = bc.loc[attacks, attacks].to_numpy(dtype=np.float64)
    y = transfer.loc[attacks, attacks].to_numpy(dtype=np.float64)
    if relative:
        y = y / np.diag(y)[:, None]
    off = ~np.eye(len(attacks), dtype=bool)
    x, y = x[off], y[off]
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        raise LogitguardError(
            f"rank_agreement needs at least 3 off-diagonal attack pairs with values in both matrices, "
            f"got {len(x)} (attacks in both: {attacks})"
        )
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        which = "bc" if np.ptp(x) == 0 else "transfer"
        raise LogitguardError(f"{which} is constant over the {len(x)} attack pairs; a rank correlation is undefined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho, p_value = spearmanr(x, y)
    return {"spearman": float(rho), "p_value": float(p_value), "pairs": int(len(x))}


# ---------------------------------------------------------------------------------------------
# Mean-logit histogram


def mean_logit_counts(table: LogitTable, *, split: str | None = "test", bins: int | Sequence[float] = 30
                      ) -> pd.DataFrame:
    """Histogram counts of each row's mean logit per attack, clean included (seed Figure 1; drawn by
    `logitguard.report.plots.mean_logit_histogram`).

    All attacks share one set of bin edges (`numpy.histogram_bin_edges` over the split's rows; or the
    edges given as `bins`). Returns a DataFrame indexed by bin centre (``mean_logit``), one column of
    counts per attack; each column sums to the attack's row count when `bins` is a number. The edges
    are in ``frame.attrs["bin_edges"]``.
    """
    if isinstance(bins, (int, np.integer)) and bins < 1:
        raise LogitguardError(f"bins must be an integer >= 1 or a sequence of edges, got {bins!r}")
    if split is not None:
        table = table.select(split=split)
    means = table.logits.mean(axis=1, dtype=np.float64)
    edges = np.histogram_bin_edges(means, bins)
    counts = {attack: np.histogram(means[table.attack == attack], edges)[0] for attack in table.attacks}
    frame = pd.DataFrame(counts, index=pd.Index((edges[:-1] + edges[1:]) / 2, name="mean_logit"))
    frame.columns.name = "attack"
    frame.attrs["bin_edges"] = edges
    return frame


# ---------------------------------------------------------------------------------------------
# Helpers


def _network(corrector: Any) -> nn.Module:
    """The torch module of a fitted corrector, or the module itself."""
    if isinstance(corrector, nn.Module):
        return corrector
    if isinstance(corrector, LogitCorrector):
        corrector._check_fitted()
    model = getattr(corrector, "model_", None)
    if not isinstance(model, nn.Module):
        raise LogitguardError(f"expected a fitted LogitCorrector or a torch module, got {type(corrector).__name__}")
    return model


def _two_layer(net: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """(first, second) Linear layers when `net` is Linear → ReLU → Linear, C → D → C (dropout ignored)."""
    if not isinstance(net, nn.Sequential):
        return None
    layers = [m for m in net if not isinstance(m, (nn.Dropout, FastDropout, nn.Identity))]
    if (len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(layers[1], nn.ReLU)
            and isinstance(layers[2], nn.Linear) and layers[0].in_features == layers[2].out_features):
        return layers[0], layers[2]
    return None


def _scores(net: nn.Module, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    method: Method = "closed_form" if _two_layer(net) is not None else "autograd"
    return supporting_scores(net, logits, labels, method=method)


def _forward(net: nn.Module, logits: np.ndarray) -> np.ndarray:
    """The network's output (N, C) for logits (N, C), in eval mode, batched."""
    dtype, device = _dtype_device(net)
    parts = []
    with _eval_mode(net), torch.inference_mode():
        for start in range(0, len(logits), _BATCH):
            z = torch.tensor(logits[start:start + _BATCH], dtype=dtype, device=device)
            parts.append(net(z).float().cpu().numpy())
    return np.concatenate(parts)


def _check_rows(logits: np.ndarray, labels: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise LogitguardError(f"logits must have shape (N, C) with N >= 1, got {logits.shape}")
    if not np.issubdtype(logits.dtype, np.number):
        raise LogitguardError(f"logits must be numeric, got dtype {logits.dtype}")
    if not np.isfinite(logits).all():
        raise LogitguardError("logits contain NaN or infinite values")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise LogitguardError(f"logits have {logits.shape[1]} classes; the corrector maps {num_classes}")
    return logits, _check_labels(labels, *logits.shape)


def _check_labels(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise LogitguardError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise LogitguardError(f"labels must lie in [0, {num_classes}); every row needs its true label")
    return labels.astype(np.int64, copy=False)


def _check_k(k: int | None, num_classes: int, *, exclude_true: bool) -> int:
    if k is None:
        k = default_k(num_classes)
    limit = num_classes - 1 if exclude_true else num_classes
    if not 1 <= k <= limit:
        raise LogitguardError(f"k must be in [1, {limit}] for {num_classes} classes"
                              f"{' (the true class is left out)' if exclude_true else ''}, got {k!r}")
    return int(k)


def _batches(logits: np.ndarray, labels: np.ndarray, batch_size: int, dtype: torch.dtype,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(logits), batch_size):
        z = torch.tensor(logits[start:start + batch_size], dtype=dtype, device=device)  # copy: views may be read-only
        y = torch.tensor(labels[start:start + batch_size], device=device)
        yield z, y


def _dtype_device(net: nn.Module) -> tuple[torch.dtype, torch.device]:
    param = next(net.parameters(), None)
    return (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))


def _to_numpy(values: torch.Tensor) -> np.ndarray:
    """float64 stays float64; float32, float16 and bfloat16 come back as float32."""
    return values.detach().to(torch.float64 if values.dtype == torch.float64 else torch.float32).cpu().numpy()


def _distribution(values: Any, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise LogitguardError(f"{name} must be a non-empty 1-D distribution, got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise LogitguardError(f"{name} must hold non-negative finite values")
    total = values.sum()
    if total <= 0:
        raise LogitguardError(f"{name} sums to 0; a distribution needs positive mass")
    return values / total


@contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) for the duration; each submodule's own mode is restored after."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
