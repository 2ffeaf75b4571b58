"""The logit corrector (seed 000, Algorithm 1): an MLP that maps attacked logits back to the true label.

A two-layer network C → D → C (ReLU, dropout 0.5) is trained with cross-entropy on mini-batches in
which every sample shows its clean logits with probability ``p_clean`` and its adversarial logits
otherwise. The mix is what lets one network keep most clean accuracy while recovering attacked rows.

It is fed in memory (`fit`, `fit_table`) or streamed from Parquet files (`fit_table(path, stream=True)`);
the training loop and both batch builders live in `logitguard.defenses.corrector_training`.

Saved files use the shared estimator format (`logitguard.defenses.estimator`: plain arrays + a JSON header);
``.pt`` files from earlier versions still load, through ``torch.load(weights_only=True)``.

Torch is needed only to train, to run on a GPU and to read those ``.pt`` files: a corrector loaded from
an ``.npz`` file (or a guard) corrects on the CPU with NumPy alone — two matrix products, equal to the
torch forward to float32 rounding. A fitted corrector takes the same NumPy path on the CPU (its torch
module's weights, read without a copy), so fitting, saving and loading never change a corrected logit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LogitguardError
from .estimator import Estimator, check_logits, choose_attacks, not_fitted
from .math.corrector import corrector_logits
from ..tables import CLEAN, LogitTable, TableSource, holdout_mask, pair, read_keys, read_table, require_one_split

_NUMPY_BATCH = 1024  # rows per NumPy forward: the (rows, D) hidden layer stays ~40 MB at D=10,000
# The fitted weights, named as in the torch module's state_dict: W1 (D, C), b1 (D,), W2 (C, D), b2 (C,).
WEIGHT_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")

if TYPE_CHECKING:
    from torch import nn


def _torch(purpose: str, hint: str = "applying a corrector saved as .npz on the CPU does not need it") -> Any:
    """The torch module, imported on first use; a `LogitguardError` saying how to get it when it is missing."""
    try:
        import torch
    except ImportError:
        raise LogitguardError(f"{purpose} needs torch, which is not installed: pip install 'logitguard[train]' "
                              f"({hint})") from None
    return torch


def __getattr__(name: str) -> Any:
    # The torch network (`logitguard.defenses._corrector_net`), imported on first use so that applying a saved corrector
    # needs no torch.
    if name in ("build_mlp", "FastDropout"):
        _torch(f"logitguard.defenses.corrector.{name}")
        from . import _corrector_net

        return getattr(_corrector_net, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LogitCorrector(Estimator):
    """Recover the true label from (possibly attacked) logits.

    Parameters (keyword-only; defaults are the paper's)
    ----------
    hidden : width D of the hidden layer.
    p_clean : probability that a training sample shows its clean logits instead of its attacked ones.
    dropout : dropout probability after the hidden ReLU.
    lr, weight_decay : Adam's step size and L2 penalty.
    batch_size, epochs : mini-batch size and number of passes over the training pairs.
    validation_fraction : share of samples (by sample id, so a sample's clean and attacked rows stay
        together) held out to choose the best epoch; 0 trains on everything and keeps the last epoch.
    patience : with validation, stop after this many epochs without improvement.
    seed : seeds initialisation, dropout, shuffling and the clean/attacked draws.
    device : torch device for training and inference.
    progress : show a progress bar over epochs.

    Learned attributes
    ------------------
    weights_ : the fitted weights as float32 arrays, keyed by `WEIGHT_KEYS`: W1 (D, C), b1 (D,), W2 (C, D), b2 (C,).
    model_ : the torch module (eval mode after `fit`); built from `weights_` on first use after `load`
        (needs torch). Setting it replaces the weights.
    n_classes_ : C.   class_names_ : list of C names.   attacks_ : attacks trained on.
    history_ : one dict per epoch: ``epoch``, ``loss`` and, with validation, ``val_clean_accuracy``,
        ``val_robust_accuracy`` and ``val_score`` (their p_clean-weighted mean).
    best_epoch_ : the epoch whose weights were kept.
    """

    kind = "corrector"
    fitted_attribute = "weights_"
    describes = "corrector"

    def __init__(
        self,
        *,
        hidden: int = 10_000,
        p_clean: float = 0.3,
        dropout: float = 0.5,
        lr: float = 5e-5,
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        epochs: int = 50,
        validation_fraction: float = 0.0,
        patience: int = 5,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
    ) -> None:
        self.hidden = hidden
        self.p_clean = p_clean
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.epochs = epochs
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.seed = seed
        self.device = device
        self.progress = progress

    def _check_params(self) -> None:
        _check("hidden", self.hidden, self.hidden >= 1, "an integer >= 1")
        _check("p_clean", self.p_clean, 0.0 <= self.p_clean <= 1.0, "in [0, 1]")
        _check("dropout", self.dropout, 0.0 <= self.dropout < 1.0, "in [0, 1)")
        _check("lr", self.lr, self.lr > 0, "> 0")
        _check("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1")
        _check("epochs", self.epochs, self.epochs >= 1, "an integer >= 1")
        _check("validation_fraction", self.validation_fraction, 0.0 <= self.validation_fraction < 1.0, "in [0, 1)")
        _check("patience", self.patience, self.patience >= 1, "an integer >= 1")

    # -- training ----------------------------------------------------------------------------

    def fit(
        self,
        clean: np.ndarray,
        attacked: np.ndarray,
        labels: np.ndarray,
        *,
        sample_id: np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        attacks: Sequence[str] = (),
    ) -> LogitCorrector:
        """Train on paired logits: row n of `clean` (N, C) and `attacked` (N, C) show sample n, label `labels[n]`.

        To mix several attacks, stack their pairs (the clean row repeats once per attack). `sample_id`
        (N,) keeps a sample's rows on one side of the validation split; it defaults to the row number.
        """
        self._check_params()
        clean, attacked = _as_logits(clean, "clean"), _as_logits(attacked, "attacked")
        labels = np.asarray(labels)
        if clean.shape != attacked.shape or labels.shape != clean.shape[:1]:
            raise LogitguardError(
                f"clean {clean.shape}, attacked {attacked.shape} and labels {labels.shape} must have shapes "
                "(N, C), (N, C) and (N,)"
            )
        num_classes = clean.shape[1]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise LogitguardError(f"labels must lie in [0, {num_classes}); every training row needs its true label")
        sample_id = np.arange(len(labels)) if sample_id is None else np.asarray(sample_id)
        held_out = holdout_mask(sample_id, self.validation_fraction, self.seed)
        if held_out.all():
            raise LogitguardError("validation_fraction leaves no training rows; lower it or add data")
        validation = None
        if held_out.any():
            validation = (clean[held_out], attacked[held_out], labels[held_out])
        training = (clean[~held_out], attacked[~held_out], labels[~held_out])
        self._start(num_classes, class_names, attacks)
        from .corrector_training import paired_batches, train

        return train(self, lambda rng: paired_batches(*training, rng, p_clean=self.p_clean,
                                                      batch_size=self.batch_size), validation)

    def fit_table(
        self,
        table: LogitTable | TableSource | str | os.PathLike,
        attacks: str | Sequence[str] | None = None,
        *,
        stream: bool = False,
        buffer_rows: int = 65536,
    ) -> LogitCorrector:
        """Train on the rows of a table, of one split, for the given attack(s) (default: every attack), mixed in
        one training set.

        `table` is a `LogitTable` (select its rows first: ``table.select(split="train")``), or a table on disk:
        a `TableSource` (``TableSource(path, split="train")``) or a path (the whole table). Rows of several
        splits are refused. With ``stream=True`` (a table on disk only) the rows are streamed from disk through
        a shuffle buffer of `buffer_rows` rows instead of being loaded.
        """
        self._check_params()
        purpose = "training a corrector"
        if isinstance(table, LogitTable):
            if stream:
                raise LogitguardError("stream=True needs the path of a table, not a loaded LogitTable")
            require_one_split(table, purpose, hint="train")
            attacks = choose_attacks(attacks, table.attacks)
            _check_present(table.attacks, attacks)
        else:
            source = TableSource.of(table)
            keys = read_keys(source)
            require_one_split(keys, purpose, hint="train")
            counts = {name: int((keys.attack == name).sum()) for name in keys.attacks}
            del keys
            attacks = choose_attacks(attacks, list(counts))
            _check_present(list(counts), attacks)
            if stream:
                from .corrector_training import fit_stream

                return fit_stream(self, source, attacks, counts, buffer_rows)
            table = read_table(source, attacks=[CLEAN, *attacks], columns=[])
        pairs = [pair(table, name) for name in attacks]
        clean = np.concatenate([p.clean.logits for p in pairs])
        self.fit(
            clean,
            np.concatenate([p.attacked.logits for p in pairs]),
            np.concatenate([p.clean.labels for p in pairs]),
            sample_id=np.concatenate([p.clean.sample_id for p in pairs]),
            class_names=table.class_names,
            attacks=attacks,
        )
        return self

    def _start(self, num_classes: int, class_names: Sequence[str] | None, attacks: Sequence[str]) -> None:
        names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
        if len(names) != num_classes:
            raise LogitguardError(f"got {len(names)} class names for {num_classes} classes")
        self.n_classes_ = num_classes
        self.class_names_ = names
        self.attacks_ = list(attacks)

    # -- inference ---------------------------------------------------------------------------

    def correct(self, logits: np.ndarray) -> np.ndarray:
        """Corrected logits (N, C) float32 for logits (N, C); their argmax is the corrected label.

        On the CPU one path serves every corrector, fitted or loaded: the NumPy forward on the float32
        weights (`weights_`, read without a copy from the torch module after `fit`), so a corrector and its
        saved copy give identical results by construction. The torch module runs only on a GPU (pipelined
        transfers) or when `model_` was set to a module of another shape (a quantised or cast network).
        """
        self._check_fitted()
        logits = np.ascontiguousarray(check_logits(logits, num_classes=self.n_classes_, dtype=np.float32)[0])
        if str(self.device).split(":")[0] == "cpu":
            weights = self._plain_weights()
            if weights is not None:
                return self._correct_numpy(logits, weights)
        model = self.model_
        _torch("running a corrector on a torch device")
        from ._corrector_net import correct_with_module

        return correct_with_module(model, logits, self.device)

    def _plain_weights(self) -> dict[str, np.ndarray] | None:
        """The float32 weights of the plain C → D → C network, or None when `model_` is another module."""
        model = self.__dict__.get("_model")
        if model is None:
            return self.weights_
        state = model.state_dict()
        if tuple(state) != WEIGHT_KEYS or any(str(v.dtype) != "torch.float32" for v in state.values()):
            return None
        return self.weights_

    def _correct_numpy(self, logits: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
        """The eval-mode forward in NumPy (`logitguard.defenses.math.corrector`, shared with the producer's
        mirror): relu(x W1ᵀ + b1) W2ᵀ + b2 for x (N, C) float32, batch by batch."""
        w1, b1, w2, b2 = (np.asarray(weights[k], dtype=np.float32) for k in WEIGHT_KEYS)
        # Transposed views, not copies: BLAS reads them as they lie, and a copy would cost a pass over
        # every weight per call (8 MB at C=1000, D=1,000), more than the product itself for one row.
        w1t, w2t = w1.T, w2.T  # (C, D), (D, C)
        out = np.empty_like(logits)
        for start in range(0, len(logits), _NUMPY_BATCH):
            out[start:start + _NUMPY_BATCH] = corrector_logits(logits[start:start + _NUMPY_BATCH], w1t, b1, w2t, b2)
        return out

    def predict(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> np.ndarray:
        """Corrected labels (N,) int64 for logits (N, C); `noisy_logits` is accepted and ignored (the
        corrector reads one logit vector), so every corrector takes the same arguments."""
        return self.correct(logits).argmax(axis=1)

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """Accuracy of the corrected labels (scikit-learn's `score` for classifiers)."""
        return float((self.predict(logits) == np.asarray(labels)).mean())

    def correct_table(self, table: LogitTable) -> LogitTable:
        """`table` with corrected ``logits`` and their argmax as ``pred``.

        Keys, labels and perturbation sizes are kept; ``noisy_logits``, ``features`` and ``success``
        described the uncorrected model and are dropped. The metadata records the corrector under
        ``corrected_by``, so `inspect` of the result reports accuracy after correction.
        """
        corrected = self.correct(table.logits)
        kept = {name: table.column(name) for name in ("linf", "l2") if name in table.columns}
        metadata = {**table.metadata, "corrected_by": {"attacks": self.attacks_, **self.get_params()}}
        for runtime in ("progress", "device"):
            del metadata["corrected_by"][runtime]
        return LogitTable.from_arrays(
            logits=corrected, sample_id=table.sample_id, split=table.split, attack=table.attack,
            label=table.labels, pred=corrected.argmax(axis=1), metadata=metadata, **kept,
        )

    def predict_table(self, table: LogitTable) -> np.ndarray:
        """Corrected labels for every row of `table` (the defense protocol used by `evaluate`)."""
        return self.predict(table.logits)

    # -- persistence ---------------------------------------------------------------------------

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        state = {"n_classes": self.n_classes_, "class_names": self.class_names_, "attacks": self.attacks_,
                 "history": self.history_, "best_epoch": self.best_epoch_}
        return state, self.weights_

    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._start(state["n_classes"], state["class_names"], state["attacks"])
        self.history_, self.best_epoch_ = state["history"], state["best_epoch"]
        c, d = self.n_classes_, int(self.hidden)
        shapes = dict(zip(WEIGHT_KEYS, [(d, c), (d,), (c, d), (c,)]))
        if sorted(arrays) != sorted(WEIGHT_KEYS):
            raise ValueError(f"weights do not fit the stored shape (arrays {sorted(arrays)}, expected {list(WEIGHT_KEYS)})")
        weights = {k: np.ascontiguousarray(arrays[k], dtype=np.float32) for k in WEIGHT_KEYS}
        wrong = {k: v.shape for k, v in weights.items() if v.shape != shapes[k]}
        if wrong:
            raise ValueError(f"weights do not fit the stored shape ({wrong}; expected {shapes})")
        self.__dict__.pop("_model", None)
        self._weights = weights

    # -- the weights: NumPy arrays after `load`, a torch module after `fit` -------------------

    def __sklearn_is_fitted__(self) -> bool:
        return self.__dict__.get("_model") is not None or self.__dict__.get("_weights") is not None

    @property
    def weights_(self) -> dict[str, np.ndarray]:
        """The fitted weights (float32 arrays keyed by `WEIGHT_KEYS`), read from the torch module if present."""
        model = self.__dict__.get("_model")
        if model is not None:
            return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        if self.__dict__.get("_weights") is None:
            raise not_fitted(self)
        return self._weights

    @property
    def model_(self) -> nn.Module:
        """The torch module (eval mode), built from `weights_` on first use; needs torch."""
        model = self.__dict__.get("_model")
        if model is None:
            weights = self.weights_
            torch = _torch("a corrector's torch module")
            from ._corrector_net import build_mlp

            model = build_mlp(self.n_classes_, int(self.hidden), self.dropout)
            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
            model = self._model = model.to(self.device).eval()
        return model

    @model_.setter
    def model_(self, model: nn.Module) -> None:
        self._model = model
        self.__dict__.pop("_weights", None)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "cpu") -> LogitCorrector:
        """Read a corrector written by `save` (or a ``.pt`` file of an earlier version); never unpickles."""
        return super().load(path, device=device, progress=False)




def _as_logits(values: np.ndarray, name: str) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[0] == 0:
        raise LogitguardError(f"{name} must have shape (N, C) with N >= 1, got {values.shape}")
    if not np.isfinite(values).all():
        raise LogitguardError(f"{name} contain NaN or infinite values")
    return values


def _check_present(available: Sequence[str], attacks: Sequence[str]) -> None:
    missing = [name for name in (CLEAN, *attacks) if name not in available]
    if missing:
        raise LogitguardError(f"no {missing} rows in this table; it has {list(available)}")


def _check(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise LogitguardError(f"{name} must be {expected}, got {value!r}")
