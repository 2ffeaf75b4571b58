"""How a guard is fitted: which detector and corrector, on which rows, with what provenance.

`fit_guard_parts` fits a detector (and a corrector) on the ``train`` rows of a table and returns an
unmeasured `Guard`; `package_pipeline` wraps the files of a pipeline manifest. Measuring a guard per threat
model is the evaluation layer's (`logitguard.evaluation.guard.fit_guard`, which calls these).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LogitguardError
from ..files import file_sha256
from ..tables import CLEAN, LogitTable, read_table, table_files
from ..tables.threat import threat_of
from .gated import GatedDefense, check_policy
from .guard import Guard

CORRECTORS = ("corrector", "svm", "odds")
# The recommended default (docs/threat-models.md): a learned detector at 1% FPR that rejects what it
# flags. Of the shipped pipelines it is the only kind that did no harm under adaptive attack.
DEFAULT_FPR = 0.01

__all__ = ["CORRECTORS", "DEFAULT_FPR", "fit_guard_parts", "open_table", "package_pipeline", "table_fingerprint"]


def fit_guard_parts(
    table: LogitTable | str | os.PathLike,
    *,
    detector: str | None = "auto",
    corrector: str | None = None,
    on_flag: str = "reject",
    fpr: float = DEFAULT_FPR,
    attacks: list[str] | None = None,
    seed: int = 0,
) -> tuple[Guard, LogitTable]:
    """Fit a detector (and a corrector) on the ``train`` rows of `table`: (unmeasured guard, the table read).

    detector : a detector kind (`logitguard.defenses.detectors.KINDS`); ``auto`` (default): ``learned-noisy``
        when the table has noise queries, else ``learned``; None for a corrector alone.
    corrector : ``corrector`` (the logit corrector, the demo's settings, trained on PGD or the first
        attack), ``svm`` (on FGSM or the first attack), ``odds`` (an odds test's logistic rule) or None.
    on_flag : ``reject`` (default), ``correct`` or ``agree`` (`logitguard.defenses.gated`).
    fpr : the detector's target false-positive rate on clean rows.
    attacks : attacked rows the supervised parts learn from (default: every oblivious attack of the
        ``train`` split).
    """
    from .detectors import make_detector

    source, table = open_table(table)
    if detector == "auto":
        detector = "learned-noisy" if table.noisy_logits is not None else "learned"
    if corrector is not None and corrector not in CORRECTORS:
        raise LogitguardError(f"unknown corrector {corrector!r}; choose from {', '.join(CORRECTORS)}")
    check_policy(detector is not None, corrector is not None, on_flag)
    _check_logit_detector(detector)
    if "train" not in table.splits:
        raise LogitguardError(f"fitting a guard needs a 'train' split; the table has {table.splits}")
    train = table.select(split="train")
    if attacks is None:
        attacks = [a for a in train.attacks if a != CLEAN and threat_of(table.metadata, a)["model"] == "oblivious"]
    if not attacks:
        raise LogitguardError("the table has no oblivious attack to learn from; name --attacks")
    fitted_detector = None
    if detector is not None:
        params: dict[str, Any] = {"fpr": fpr}
        if detector.startswith("learned"):
            params["seed"] = seed
        fitted_detector = make_detector(detector, **params).fit_table(train, attacks=attacks)
    fitted_corrector = None if corrector is None else _fit_corrector(corrector, train, attacks, seed)
    guard = Guard(GatedDefense(fitted_detector, fitted_corrector, on_flag=on_flag),
                  class_names=table.class_names, num_queries=_queries(table, fitted_detector),
                  noise=table.metadata.get("noise"),
                  provenance=_provenance(source, table, {"attacks": attacks, "seed": seed}))
    return guard, table


def package_pipeline(manifest: str | os.PathLike, name: str,
                     table: LogitTable | str | os.PathLike) -> tuple[Guard, LogitTable, dict[str, str]]:
    """Pipeline `name` of a manifest (`logitguard.defenses.pipelines`) as an unmeasured guard for `table`:
    (guard, the table read, the sha256 of the pipeline's files)."""
    from .pipelines import load_pipelines, manifest_provenance

    specs = load_pipelines(manifest)
    if name not in specs:
        raise LogitguardError(f"{manifest}: no pipeline {name!r}; it has {', '.join(specs)}")
    spec = specs[name]
    source, table = open_table(table)
    defense = spec.build()
    files = spec.fingerprints()
    settings: dict[str, Any] = {"manifest": str(manifest), "pipeline": name, "files": files}
    fitted = manifest_provenance(manifest)  # how the manifest's files were made (an adversarial fit's rounds)
    if fitted is not None:
        settings["manifest_provenance"] = fitted
    guard = Guard(defense, class_names=table.class_names, num_queries=_queries(table, defense.detector),
                  noise=table.metadata.get("noise"), provenance=_provenance(source, table, settings))
    return guard, table, files


def table_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a table's Parquet files (relative names and contents, in sorted order)."""
    path = Path(path)
    files = [path] if path.is_file() else [Path(p) for p in table_files(path)]  # the files the reader reads
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        digest.update(bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


def open_table(table: LogitTable | str | os.PathLike) -> tuple[dict[str, Any], LogitTable]:
    """(source description, table): a path is read and fingerprinted by its files, a table by its logits."""
    if isinstance(table, LogitTable):
        digest = hashlib.sha256(np.ascontiguousarray(table.logits).tobytes()).hexdigest()
        return {"table": None, "logits_sha256": digest}, table
    return {"table": str(table), "table_sha256": table_fingerprint(table)}, read_table(table)


def _check_logit_detector(kind: str | None) -> None:
    """Refuse detector kinds that read more than logits: a guard sits in front of a remote model and sees
    only the logits it returns (and noise queries), never its features or input gradients."""
    from .detectors import KINDS, LOGIT_KINDS

    if kind is not None and kind in KINDS and kind not in LOGIT_KINDS:
        raise LogitguardError(f"a guard sees only the logits a remote model returns; the {kind!r} detector reads "
                              f"the model's internals (a table column besides the logits). Choose from "
                              f"{', '.join(LOGIT_KINDS)}")


def _queries(table: LogitTable, detector: Any) -> int:
    """K the guard expects: the detector's own record, else the table's."""
    k = getattr(detector, "n_queries_", None)
    if k:
        return int(k)
    return 0 if table.noisy_logits is None else int(table.noisy_logits.shape[1])


def _fit_corrector(kind: str, table: LogitTable, attacks: list[str], seed: int) -> Any:
    from .detectors import make_detector

    if kind == "corrector":
        from .corrector import LogitCorrector
        from .shipped import CORRECTOR

        settings = {k: v for k, v in CORRECTOR.items() if k != "attack"}
        attack = CORRECTOR["attack"] if CORRECTOR["attack"] in attacks else attacks[0]
        return LogitCorrector(**settings, seed=seed, progress=False).fit_table(table, attack)
    if kind == "svm":
        from .svm import SVMCorrector

        return SVMCorrector(seed=seed).fit_table(table, "fgsm" if "fgsm" in attacks else attacks[0])
    if table.noisy_logits is None:
        raise LogitguardError("corrector 'odds' needs noise queries (column 'noisy_logits')")
    return make_detector("odds", correction="logistic").fit_table(table, attacks=attacks)


def _provenance(source: dict[str, Any], table: LogitTable, settings: dict[str, Any]) -> dict[str, Any]:
    import sklearn

    from .. import __version__

    return {**source, "dataset": table.metadata.get("dataset"), "model": table.metadata.get("model"),
            "settings": settings, "logitguard": __version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}
