"""The contract every fitted object follows: arrays first, scikit-learn's shape, one file format.

Detectors, correctors and the SVM are scikit-learn estimators (`sklearn.base.BaseEstimator`: keyword-only
``__init__`` that only stores its arguments, `get_params`/`set_params`, `sklearn.base.clone`), take plain
arrays — ``logits (N, C)``, optional ``noisy_logits (N, K, C)``, ``labels (N,)`` — and keep what they
learn in trailing-underscore attributes. Methods on `LogitTable` (``fit_table``, ``predict_table``, …) are
thin wrappers that pick the rows and call the array methods. Using a model before `fit` raises
`NotFittedError`, which is both a `LogitguardError` and scikit-learn's own `NotFittedError`.

One file format for all of them: an ``.npz`` archive of plain arrays plus one JSON header (read with
``allow_pickle=False``)::

    {"format": "logitguard.Estimator", "format_version": 1, "estimator": "<name>",
     "params": {...}, "state": {...}}

``estimator`` names the class in `REGISTRY` (a detector's ``kind``, ``corrector``, ``svm``); ``state``
holds fitted scalars, the arrays hold the rest. A `Guard` embeds the same header and arrays under a
prefix. Files from before this format (detector and SVM ``.npz`` archives, corrector ``.pt`` files)
still load; anything newer than this version fails with a message saying to upgrade.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

from ..files import check_format_version, load_arrays, read_header, save_arrays
from ..errors import LogitguardError
from ..tables import CLEAN, LogitTable

FORMAT = "logitguard.Estimator"
FORMAT_VERSION = 1
REGISTRY: dict[str, type[Estimator]] = {}

__all__ = ["FORMAT", "FORMAT_VERSION", "Estimator", "NotFittedError", "check_logits", "choose_attacks", "load_estimator"]


class NotFittedError(LogitguardError, _SklearnNotFittedError):
    """An estimator was used before `fit` (or `load`)."""


def not_fitted(estimator: object) -> NotFittedError:
    """The error every estimator raises when used before `fit` (one message for all)."""
    return NotFittedError(f"this {type(estimator).__name__} is not fitted yet; call fit() or load() first")


class Estimator(BaseEstimator):
    """Base of every fitted logitguard object.

    Subclasses set `kind` (the name files record, registering the class for `load_estimator`), `fitted_attribute`
    (set by `fit`; its absence means "not fitted"), and implement `_state` / `_restore` for persistence.
    """

    kind: ClassVar[str]
    fitted_attribute: ClassVar[str]
    describes: ClassVar[str] = "estimator"  # the words error messages use for a file of this class
    needs_noise: ClassVar[bool] = False  # whether it reads noise queries (N, K, C) beside the logits

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("kind")
        if name:
            REGISTRY[name] = cls

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, self.fitted_attribute)

    def _check_fitted(self, attribute: str | None = None) -> None:
        """The one fitted check: `NotFittedError` unless fitted (or, mid-fit, unless `attribute` is set)."""
        fitted = self.__sklearn_is_fitted__() if attribute is None else attribute in self.__dict__
        if not fitted:
            raise not_fitted(self)

    # -- persistence -------------------------------------------------------------------------

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Fitted state: JSON-ready scalars and plain arrays."""
        raise NotImplementedError

    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Inverse of `_state`: set the fitted attributes."""
        raise NotImplementedError

    def to_arrays(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The file header and arrays of this fitted estimator (what `save` writes)."""
        self._check_fitted()
        state, arrays = self._state()
        params = {k: v for k, v in self.get_params(deep=False).items() if k not in _RUNTIME_PARAMS}
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "estimator": self._registered_name(),
                  "params": params, "state": state}
        return header, arrays

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the fitted estimator to `path` (``.npz``; refuses to replace a file unless `overwrite`)."""
        header, arrays = self.to_arrays()
        return save_arrays(Path(path), header, arrays, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, **runtime: Any) -> Estimator:
        """Read a file written by `save` (or an older logitguard), checking it holds a `cls`."""
        estimator = load_estimator(path, what=cls.describes, **runtime)
        if not isinstance(estimator, cls):
            raise LogitguardError(f"{path}: holds a {type(estimator).__name__}, not a {cls.__name__}")
        return estimator

    def _registered_name(self) -> str:
        return type(self).kind


# The module that registers each estimator that is not a detector kind (detectors register through
# `logitguard.defenses.detectors`): reading a file must not depend on which modules happened to be imported.
_HOME = {"corrector": "logitguard.defenses.corrector", "svm": "logitguard.defenses.svm"}

# Constructor arguments that say how to run, not what was learned: never written to files.
_RUNTIME_PARAMS = frozenset({"device", "progress"})


def from_arrays(header: dict[str, Any], arrays: dict[str, np.ndarray], where: str, **runtime: Any) -> Estimator:
    """Rebuild an estimator from `to_arrays` output; `where` names the source in error messages."""
    check_format_version(header.get("format_version"), FORMAT_VERSION, where)
    name = header.get("estimator", "")
    if name not in REGISTRY and isinstance(name, str):
        importlib.import_module(_HOME.get(name, "logitguard.defenses.detectors"))  # registers the class on import
    cls = REGISTRY.get(name)
    if cls is None:
        raise LogitguardError(f"{where}: unknown estimator {header.get('estimator')!r}; known: {sorted(REGISTRY)}")
    params = header.get("params")
    if not isinstance(params, dict):
        raise LogitguardError(f"{where}: header lacks the estimator's params")
    accepted = {k: v for k, v in runtime.items() if k in cls._get_param_names()}
    try:
        estimator = cls(**params, **accepted)
        estimator._restore(dict(header.get("state") or {}), dict(arrays))
    except (KeyError, TypeError, ValueError) as exc:
        raise LogitguardError(f"{where}: a damaged or incompatible {cls.__name__} file ({exc})") from None
    return estimator


def load_estimator(path: str | os.PathLike, *, what: str = "estimator", **runtime: Any) -> Estimator:
    """Any fitted estimator file: this format, or the formats that came before it (still read).

    `what` names the expected kind of file in error messages; `runtime` arguments (``device=…``) are
    passed to estimators that take them. Never unpickles.
    """
    path = Path(path)
    if not path.is_file():
        raise LogitguardError(f"no such {what} file: {path}")
    header = read_header(path)
    if header is None or header.get("format") != FORMAT:
        from .legacy import load_legacy  # the formats that came before this one

        return load_legacy(path, header, what=what, **runtime)
    header, arrays = load_arrays(path, FORMAT, what)
    return from_arrays(header, arrays, str(path), **runtime)


def choose_attacks(attacks: str | Sequence[str] | None, available: Sequence[str], *,
                   required: bool = True) -> list[str]:
    """The attacked partitions a `fit_table` learns from: `attacks` (one name or several), or every attack of
    `available` but clean when None; `LogitguardError` when one is missing, clean is named, or (when
    `required`: every corrector; a detector may learn from clean rows alone) none is left.

    Every estimator's ``fit_table(table, attacks=None)`` takes its attacks through here."""
    chosen = [a for a in available if a != CLEAN] if attacks is None else (
        [attacks] if isinstance(attacks, str) else list(attacks))
    if CLEAN in chosen:
        raise LogitguardError(f"name attacked partitions to learn from, not {CLEAN!r}; got {chosen}")
    if required and not chosen:
        raise LogitguardError(f"no attacked rows to learn from in this table; it has {list(available)}")
    missing = [a for a in chosen if a not in available]
    if missing:
        raise LogitguardError(f"no rows for attack(s) {missing} in this table; it has {list(available)}")
    return chosen


def check_logits(
    logits: Any,
    noisy_logits: Any = None,
    *,
    num_classes: int | None = None,
    num_queries: int | None = None,
    needs_noise: bool = False,
    dtype: type = np.float64,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate model outputs and return them as `dtype` arrays: logits (N, C), noise queries (N, K, C) or None.

    Raises `LogitguardError` with a precise message for a wrong shape, a wrong C or K (when given), NaN
    or infinite values, and missing noise queries when `needs_noise`.
    """
    if isinstance(logits, LogitTable):
        raise LogitguardError("got a LogitTable where arrays were expected; use the method's *_table form "
                              "(fit_table, score_table, predict_table, …)")
    try:
        logits = np.asarray(logits, dtype=dtype)
    except (TypeError, ValueError):
        raise LogitguardError("logits must be numbers in an (N, C) array") from None
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise LogitguardError(f"logits must have shape (N, C) with N >= 1 and C >= 2, got {logits.shape}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise LogitguardError(f"logits have {logits.shape[1]} classes; expected {num_classes}")
    _check_finite(logits, "logits")
    if noisy_logits is None:
        if needs_noise:
            raise LogitguardError("noise queries (noisy_logits, shape (N, K, C)) are required: "
                                  "this detector reads the model's logits on noise-perturbed copies of each input")
        return logits, None
    try:
        noisy = np.asarray(noisy_logits, dtype=dtype)
    except (TypeError, ValueError):
        raise LogitguardError("noisy_logits must be numbers in an (N, K, C) array") from None
    if noisy.ndim != 3 or noisy.shape[0] != logits.shape[0] or noisy.shape[2] != logits.shape[1]:
        raise LogitguardError(f"noisy_logits must have shape (N, K, C) = ({logits.shape[0]}, K, {logits.shape[1]}), "
                              f"got {noisy.shape}")
    if noisy.shape[1] == 0:
        raise LogitguardError("noisy_logits must hold at least one noise query (K >= 1)")
    if num_queries and noisy.shape[1] != num_queries:
        raise LogitguardError(f"noisy_logits have {noisy.shape[1]} noise queries; expected {num_queries}")
    _check_finite(noisy, "noisy_logits")
    return logits, noisy


def _check_finite(values: np.ndarray, name: str) -> None:
    # min and max propagate NaN and show ±inf without a temporary the size of `values`; the full
    # element-wise test runs only to name the first bad row.
    if np.isfinite(values.min()) and np.isfinite(values.max()):
        return
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise LogitguardError(f"{name} contain NaN or infinite values (first in row {row})")
