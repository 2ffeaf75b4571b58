"""Supporting scores (seed §5, App. B) and supporting classes.

For an attacked row z* with true label i, the *supporting score* of class k is

    S_k = ∂g(z*)_i/∂z_k − (1/C) Σ_l ∂g(z*)_l/∂z_k,

with g the corrector network in eval mode (dropout off). For the two-layer ReLU corrector the
Jacobian is J = W2 diag(m) W1 with m = 1[W1 z + b1 > 0], so a batch of score rows is one masked
matrix product, ((W2[i] − mean_l W2[l]) ⊙ m) @ W1, with no per-sample Jacobian; any other
differentiable row-wise module goes through one batched vector-Jacobian product.

The *supporting classes* of a row are its k classes of largest S_k other than the true class. On
real data the true class itself nearly always scores highest (on the digits fixture it is first in
~80% of rows and in the top 3 in ~98%), so keeping it would make every "supporting" distribution
mirror the label distribution and every ablation trivially lower the true logit.
"""

from __future__ import annotations

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


Method = Literal["closed_form", "autograd"]
_BATCH = 1024


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
    net = network_of(corrector)
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
    k = check_k(k, num_classes, exclude_true=labels is not None)
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
    scores = network_scores(network_of(corrector), row[None, :], labels)
    if class_names is None:
        class_names = getattr(corrector, "class_names_", None) or [str(c) for c in range(row.size)]
    if len(class_names) != row.size:
        raise LogitguardError(f"got {len(class_names)} class names for {row.size} classes")
    top = top_supporting(scores, k, labels=None if include_true else labels)[0]
    index = pd.Index([class_names[c] for c in top], name="class")
    return pd.Series(scores[0, top], index=index, name="supporting_score")


def network_of(corrector: Any) -> nn.Module:
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


def network_scores(net: nn.Module, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    method: Method = "closed_form" if _two_layer(net) is not None else "autograd"
    return supporting_scores(net, logits, labels, method=method)


def network_forward(net: nn.Module, logits: np.ndarray) -> np.ndarray:
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


def check_k(k: int | None, num_classes: int, *, exclude_true: bool) -> int:
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
