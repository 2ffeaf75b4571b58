"""Guard: one file holding everything needed to check a remote model's logits before acting on them.

A guard is a `GatedDefense` (detector, corrector, ``on_flag`` policy) plus what it expects and what it
is worth:

- the input it expects: class names (so C), the number of noise queries K and the noise recipe the
  producer used for them (the model's logits on noise-perturbed copies of the same input);
- the threat-model figures it was measured under (`logitguard.evaluation.guard.measure_guard`): per-sample
  worst-case robust accuracy per threat model and L-inf budget on the table's test split, and which threat
  models were *not* measured;
- provenance: the table's fingerprint, the fitted files' fingerprints, library versions, a timestamp.

It is saved as one ``.npz`` of plain arrays with a JSON header (the estimator format of
`logitguard.defenses.estimator`, detector and corrector arrays under ``detector/`` and ``corrector/``), read
without unpickling. `Guard.check` takes arrays and returns a `Decision` per row.

This module is the artefact only: how a guard is fitted is `logitguard.defenses.recipe`, how it is
measured `logitguard.evaluation.guard`, how it reads `logitguard.report.guard`. Loading one imports no
evaluation or report module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import LogitguardError
from ..files import load_arrays, refuse_overwrite, save_arrays
from ..noise import NoiseRecipe
from ..tables import LogitTable
from .decision import ABSTAIN, Decision
from .estimator import check_logits, from_arrays
from .gated import GatedDefense, as_corrector

FORMAT = "logitguard.Guard"
FORMAT_VERSION = 1

__all__ = ["FORMAT", "FORMAT_VERSION", "Guard", "corrector_name"]


class Guard:
    """A fitted defense and its input schema, evaluation and provenance; see the module docstring.

    Build one with `logitguard.fit_guard` (fit the parts on a table and measure them) or
    `logitguard.guard_from_pipeline` (package the files of a pipeline manifest), then `save` / `Guard.load`.

    Attributes
    ----------
    defense : the `GatedDefense`.
    class_names : list of C class names.
    num_queries : K, the noise queries per row that `check` expects (0: none needed).
    noise : the producer's noise recipe (table metadata ``noise``) or None; `noise_recipe` reads it.
    threat : JSON-ready records of `threat_model_table` for this guard (and the bare model, ``none``).
    unmeasured : {threat model: why it has no figure}.
    provenance : table and file fingerprints, versions, creation time.
    """

    def __init__(self, defense: GatedDefense, *, class_names: list[str], num_queries: int = 0,
                 noise: dict[str, Any] | None = None, threat: list[dict[str, Any]] | None = None,
                 unmeasured: dict[str, str] | None = None, provenance: dict[str, Any] | None = None) -> None:
        if len(class_names) < 2:
            raise LogitguardError(f"a guard needs at least 2 class names, got {class_names!r}")
        if defense.needs_noise and num_queries < 1:
            raise LogitguardError("this defense reads noise queries; num_queries must be >= 1")
        self.defense = defense
        self.class_names = [str(c) for c in class_names]
        self.num_queries = int(num_queries) if defense.needs_noise else 0
        self.noise = noise
        self.threat = threat or []
        self.unmeasured = unmeasured or {}
        self.provenance = provenance or {}

    # -- checking -----------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def needs_noise(self) -> bool:
        return self.num_queries > 0

    @property
    def noise_recipe(self) -> NoiseRecipe | None:
        """The `NoiseRecipe` of the K noise queries `check` expects (make them with `logitguard.noisy_copies`);
        None when the guard reads none (K = 0) or, for a guard fitted on a table without noise metadata, when
        the recipe is unknown."""
        if not self.needs_noise:
            return None
        recipe = NoiseRecipe.from_metadata(self.noise)
        if recipe is not None and len(recipe) != self.num_queries:
            raise LogitguardError(f"this guard expects {self.num_queries} noise queries but its recipe lists "
                                  f"{len(recipe)}")
        return recipe

    def check(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> Decision:
        """Check logits (N, C) (and noise queries (N, K, C) when `needs_noise`): a `Decision` of (N,) arrays
        ``model_label``, ``flagged``, ``score`` and ``label`` (`ABSTAIN`, -1, where rejected).

        Raises `LogitguardError` for a wrong C or K, NaN or infinite values, or missing noise queries.
        """
        logits, noisy = check_logits(logits, noisy_logits if self.needs_noise else None,
                                     num_classes=self.num_classes, num_queries=self.num_queries or None,
                                     needs_noise=self.needs_noise)
        return self.defense.check(logits, noisy)

    def check_table(self, table: LogitTable) -> pd.DataFrame:
        """`check` on every row of `table`, as a DataFrame keyed like the table (``split``, ``sample_id``,
        ``attack``) with ``model_label``, ``flagged``, ``score``, ``label`` and ``abstained``."""
        self.check_schema(table)
        decision = self.check(table.logits, table.noisy_logits if self.needs_noise else None)
        frame = pd.DataFrame({"split": table.split, "sample_id": table.sample_id, "attack": table.attack,
                              **decision._asdict()})
        frame["abstained"] = frame["label"] == ABSTAIN
        return frame

    def defend_table(self, table: LogitTable) -> LogitTable:
        """`table` with ``pred`` (null where rejected) and ``flagged`` (`GatedDefense.defend_table`), after
        checking that the table has the classes and noise queries this guard expects."""
        self.check_schema(table)
        return self.defense.defend_table(table)

    def check_schema(self, table: LogitTable) -> None:
        """Refuse a table (or batch) without this guard's C classes or, where it reads them, its K noise queries."""
        if table.num_classes != self.num_classes:
            raise LogitguardError(f"the table has {table.num_classes} classes; this guard expects {self.num_classes}")
        if self.needs_noise:
            if table.noisy_logits is None:
                raise LogitguardError("this guard needs noise queries (column 'noisy_logits')")
            if table.noisy_logits.shape[1] != self.num_queries:
                raise LogitguardError(f"the table has {table.noisy_logits.shape[1]} noise queries; this guard "
                                      f"expects {self.num_queries}")

    # -- description and files ------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """JSON-ready description as saved: input schema, policy, threshold, achieved FPR, threat figures,
        provenance (`logitguard.evaluation.guard.describe_guard` adds the intervals of older records)."""
        detector = self.defense.detector
        corrector = self.defense.corrector
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "classes": self.class_names, "num_classes": self.num_classes, "num_queries": self.num_queries,
            "noise": self.noise, "on_flag": self.defense.on_flag,
            "detector": None if detector is None else {
                "kind": detector.kind, "params": detector.get_params(), "threshold": detector.threshold_,
                "fpr": detector.fpr, "achieved_fpr": detector.achieved_fpr_,
                "calibration_rows": len(detector.calibration_scores_)},
            "corrector": None if corrector is None else corrector_name(corrector),
            "threat": self.threat, "unmeasured": self.unmeasured, "provenance": self.provenance,
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the guard as one file (refuses to replace an existing file unless `overwrite`)."""
        path = Path(path)
        refuse_overwrite([path], overwrite)
        header = {k: v for k, v in self.info().items() if k not in ("detector", "corrector")}
        arrays: dict[str, np.ndarray] = {}
        for role, part in (("detector", self.defense.detector), ("corrector", self.defense.corrector)):
            if part is None:
                header[role] = None
                continue
            estimator = getattr(part, "odds", part)  # an OddsCorrector is saved as its odds test
            part_header, part_arrays = estimator.to_arrays()
            header[role] = part_header
            arrays |= {f"{role}/{k}": v for k, v in part_arrays.items()}
        return save_arrays(path, header, arrays, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Guard:
        """Read a guard file (plain arrays; nothing is unpickled)."""
        path = Path(path)
        header, arrays = load_arrays(path, FORMAT, "guard")
        version = header.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise LogitguardError(f"{path}: guard format_version {version!r}; this logitguard reads up to "
                                  f"{FORMAT_VERSION} (upgrade logitguard)")
        parts = {}
        for role in ("detector", "corrector"):
            sub = header.get(role)
            prefix = f"{role}/"
            parts[role] = None if sub is None else from_arrays(
                sub, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, f"{path} ({role})")
        try:
            defense = GatedDefense(parts["detector"], None if parts["corrector"] is None else
                                   as_corrector(parts["corrector"]), on_flag=header["on_flag"])
            return cls(defense, class_names=header["classes"], num_queries=header["num_queries"],
                       noise=header.get("noise"), threat=header.get("threat"), unmeasured=header.get("unmeasured"),
                       provenance=header.get("provenance"))
        except (KeyError, TypeError) as exc:
            raise LogitguardError(f"{path}: a damaged guard file ({exc})") from None

    def __repr__(self) -> str:
        detector = self.defense.detector
        parts = [f"C={self.num_classes}", f"K={self.num_queries}", f"on_flag={self.defense.on_flag!r}"]
        if detector is not None:
            parts.insert(0, f"detector={detector.kind!r}@{detector.fpr:g}")
        if self.defense.corrector is not None:
            parts.insert(1, f"corrector={corrector_name(self.defense.corrector)['name']!r}")
        return f"Guard({', '.join(parts)})"


def corrector_name(corrector: Any) -> dict[str, Any]:
    """{"name": corrector, svm or odds, "params": ...}: how a guard names its corrector."""
    estimator = getattr(corrector, "odds", corrector)
    name = estimator.kind if estimator.kind in ("corrector", "svm") else "odds"  # odds or odds-single: odds
    return {"name": name, "params": estimator.get_params()}
