"""Reading estimator files written before the shared estimator format (`logitguard.defenses.estimator`).

Three earlier formats are still read, never written: torch ``.pt`` correctors (``format:
logitguard.LogitCorrector``, read with ``weights_only=True``), detector archives (``logitguard.Detector``) and
SVM archives (``logitguard.SVMCorrector``). Each reader builds the estimator from its parameters and hands
its fitted state to the estimator's own ``_restore``, so a legacy file and a resaved one predict alike.
`load_estimator` comes here for anything that is not the current format; nothing here unpickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LogitguardError
from ..files import load_arrays
from .estimator import Estimator

CORRECTOR_FORMAT = "logitguard.LogitCorrector"  # torch .pt files (no npz header)
DETECTOR_FORMAT = "logitguard.Detector"
SVM_FORMAT = "logitguard.SVMCorrector"


def load_legacy(path: Path, header: dict[str, Any] | None, *, what: str = "estimator",
                **runtime: Any) -> Estimator:
    """The estimator in `path`, an earlier format; `header` is its npz header (None: not an npz, so a torch
    ``.pt`` corrector). `LogitguardError` for anything else."""
    if header is None:
        return load_corrector_pt(path, what=what, **runtime)
    fmt = header.get("format")
    if fmt == DETECTOR_FORMAT:
        return load_detector_npz(path)
    if fmt == SVM_FORMAT:
        return load_svm_npz(path)
    raise LogitguardError(f"{path}: not a logitguard {what} file (format {fmt!r})")


def load_corrector_pt(path: Path, *, device: str = "cpu", progress: bool = False, what: str = "corrector") -> Estimator:
    """A torch ``.pt`` corrector from before the shared format, read with ``weights_only=True``."""
    from .corrector import LogitCorrector, _torch

    torch = _torch(f"{path}: reading a {what} in the legacy torch .pt format",
                   "or, where torch is installed, resave it once as .npz, which loads without torch: "
                   "LogitCorrector.load(old).save(new)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean the same thing here
        raise LogitguardError(f"{path}: not a logitguard {what} file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CORRECTOR_FORMAT:
        raise LogitguardError(f"{path}: not a logitguard corrector file")
    if state.get("format_version", 0) > 1:
        raise LogitguardError(f"{path}: written by a newer logitguard (format {state['format_version']}); upgrade")
    corrector = LogitCorrector(**state["params"], device=device, progress=progress)
    try:
        corrector._restore(state, {k: v.numpy() for k, v in state["state_dict"].items()})
    except ValueError as exc:
        raise LogitguardError(f"{path}: {exc}") from None
    return corrector


def load_detector_npz(path: Path) -> Estimator:
    """A detector archive from before the shared format (``format: logitguard.Detector``)."""
    from .detectors import Detector  # registers every detector kind
    from .estimator import REGISTRY

    header, arrays = load_arrays(path, DETECTOR_FORMAT, "detector")
    if header.get("format_version", 0) > 1:
        raise LogitguardError(f"{path}: written by a newer logitguard; upgrade")
    cls = REGISTRY.get(header.get("kind", ""))
    if cls is None or not issubclass(cls, Detector):
        raise LogitguardError(f"{path}: unknown detector kind {header.get('kind')!r}")
    detector = cls(**header["params"])
    detector._restore({"threshold": header["threshold"], "achieved_fpr": header["achieved_fpr"]}, arrays)
    return detector


def load_svm_npz(path: Path) -> Estimator:
    """An SVM archive from before the shared format (``format: logitguard.SVMCorrector``)."""
    from .svm import SVMCorrector

    header, arrays = load_arrays(path, SVM_FORMAT, "SVM corrector")
    svm = SVMCorrector(**header["params"])
    try:
        svm._restore({"attacks": header.get("attacks", [])}, arrays)
    except KeyError as exc:
        raise LogitguardError(f"{path}: {exc}") from None
    return svm
