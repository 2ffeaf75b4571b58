"""Guard: one file holding everything needed to check a remote model's logits before acting on them.

A guard is a `GatedDefense` (detector, corrector, ``on_flag`` policy) plus what it expects and what it
is worth:

- the input it expects: class names (so C), the number of noise queries K and the noise recipe the
  producer used for them (the model's logits on noise-perturbed copies of the same input);
- the threat-model figures it was evaluated under (`logitguard.evaluation.threat`): per-sample worst-case robust
  accuracy per threat model and L-inf budget, measured on the table's test split, and which threat
  models were *not* measured;
- provenance: the table's fingerprint, the fitted files' fingerprints, library versions, a timestamp.

It is saved as one ``.npz`` of plain arrays with a JSON header (the estimator format of
`logitguard.defenses.estimator`, detector and corrector arrays under ``detector/`` and ``corrector/``), read
without unpickling. `Guard.check` takes arrays and returns a `Decision` per row.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..files import load_arrays, refuse_overwrite, save_arrays
from .gated import ABSTAIN, Decision, GatedDefense, as_corrector, check_policy
from ..errors import LogitguardError
from .estimator import check_logits, from_arrays
from ..tables import CLEAN, LogitTable, read_table, table_files
from ..evaluation.threat import fill_intervals, threat_model_table, to_records
from ..files import file_sha256
from ..tables.threat import DEFAULT_BUDGETS, NO_DEFENSE, THREAT_MODELS, format_budget, threat_of

FORMAT = "logitguard.Guard"
FORMAT_VERSION = 1
CORRECTORS = ("corrector", "svm", "odds")
# The recommended default (docs/threat-models.md): a learned detector at 1% FPR that rejects what it
# flags. Of the shipped pipelines it is the only kind that did no harm under adaptive attack.
DEFAULT_FPR = 0.01
GUARD_NAME = "guard"  # the pipeline name a freshly fitted guard is evaluated under

__all__ = ["CORRECTORS", "FORMAT", "FORMAT_VERSION", "Guard", "table_fingerprint"]


class Guard:
    """A fitted defense and its input schema, evaluation and provenance; see the module docstring.

    Build one with `Guard.fit` (fit the parts on a table) or `Guard.from_pipeline` (package files of a
    pipeline manifest), then `save` / `Guard.load`.

    Attributes
    ----------
    defense : the `GatedDefense`.
    class_names : list of C class names.
    num_queries : K, the noise queries per row that `check` expects (0: none needed).
    noise : the producer's noise recipe (table metadata ``noise``) or None.
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

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        table: LogitTable | str | os.PathLike,
        *,
        detector: str | None = "auto",
        corrector: str | None = None,
        on_flag: str = "reject",
        fpr: float = DEFAULT_FPR,
        attacks: list[str] | None = None,
        seed: int = 0,
        budgets: tuple[float, ...] = DEFAULT_BUDGETS,
    ) -> Guard:
        """Fit a detector (and a corrector) on the ``train`` rows of `table`, then evaluate on ``test``.

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

        source, table = _open(table)
        has_noise = table.noisy_logits is not None
        if detector == "auto":
            detector = "learned-noisy" if has_noise else "learned"
        if corrector is not None and corrector not in CORRECTORS:
            raise LogitguardError(f"unknown corrector {corrector!r}; choose from {', '.join(CORRECTORS)}")
        check_policy(detector is not None, corrector is not None, on_flag)
        _check_logit_detector(detector)
        if "train" not in table.splits:
            raise LogitguardError(f"fitting a guard needs a 'train' split; the table has {table.splits}")
        if attacks is None:
            attacks = [a for a in table.select(split="train").attacks
                       if a != CLEAN and threat_of(table.metadata, a)["model"] == "oblivious"]
        if not attacks:
            raise LogitguardError("the table has no oblivious attack to learn from; name --attacks")
        fitted_detector = None
        if detector is not None:
            params: dict[str, Any] = {"fpr": fpr}
            if detector in ("learned", "learned-noisy"):
                params["seed"] = seed
            fitted_detector = make_detector(detector, **params).fit_table(table, attacks=attacks)
        fitted_corrector = None if corrector is None else _fit_corrector(corrector, table, attacks, seed)
        guard = cls(GatedDefense(fitted_detector, fitted_corrector, on_flag=on_flag),
                    class_names=table.class_names, num_queries=_queries(table, fitted_detector),
                    noise=table.metadata.get("noise"),
                    provenance=_provenance(source, table, {"attacks": attacks, "seed": seed}))
        return guard.evaluate(table, name=GUARD_NAME, budgets=budgets)

    @classmethod
    def from_pipeline(cls, manifest: str | os.PathLike, name: str, table: LogitTable | str | os.PathLike, *,
                      budgets: tuple[float, ...] = DEFAULT_BUDGETS) -> Guard:
        """Package pipeline `name` of a manifest (`logitguard.defenses.pipelines`) as a guard, evaluated on `table`.

        Adaptive attacks in the table aimed at `name` count only when they recorded the same files
        (sha256) as the manifest's: then the guard carries adaptive figures for exactly these weights.
        """
        from .pipelines import load_pipelines

        specs = load_pipelines(manifest)
        if name not in specs:
            raise LogitguardError(f"{manifest}: no pipeline {name!r}; it has {', '.join(specs)}")
        spec = specs[name]
        source, table = _open(table)
        defense = spec.build()
        guard = cls(defense, class_names=table.class_names, num_queries=_queries(table, defense.detector),
                    noise=table.metadata.get("noise"),
                    provenance=_provenance(source, table, {"manifest": str(manifest), "pipeline": name,
                                                           "files": spec.fingerprints()}))
        return guard.evaluate(table, name=name, budgets=budgets, files=spec.fingerprints())

    def evaluate(self, table: LogitTable, *, name: str = GUARD_NAME, budgets: tuple[float, ...] = DEFAULT_BUDGETS,
                 files: dict[str, str] | None = None) -> Guard:
        """Measure this guard per threat model on the ``test`` rows of `table` and record the figures.

        Surrogate and adaptive attacks count when aimed at pipeline `name`; adaptive ones only when they
        recorded `files` (the sha256 of the files they attacked). Returns self.
        """
        usable, skipped = [], []
        for attack in table.attacks:
            threat = threat_of(table.metadata, attack)
            target = threat.get("target")
            if threat["model"] in ("surrogate", "adaptive") and target not in (name, NO_DEFENSE):
                continue
            if threat["model"] == "adaptive" and target == name and threat.get("defense_files") != files:
                skipped.append(attack)
                continue
            usable.append(attack)
        if "test" not in table.splits:
            raise LogitguardError(f"evaluating a guard needs a 'test' split; the table has {table.splits}")
        rows = table.select(split="test", attacks=usable)
        frame = threat_model_table(rows, {name: self.defense}, budgets=budgets, split=None)
        frame["pipeline"] = frame["pipeline"].replace({name: GUARD_NAME} if name != GUARD_NAME else {})
        self.threat = to_records(frame)
        measured = set(frame.loc[frame["pipeline"] == GUARD_NAME, "threat_model"])
        self.unmeasured = {}
        present = {t["model"] for t in (threat_of(table.metadata, a) for a in usable if a != CLEAN)
                   if t.get("target") in (None, name)}
        for model in THREAT_MODELS:
            if model in measured:
                continue
            if model == "adaptive" and skipped:
                why = (f"the table's {len(skipped)} adaptive partitions aimed at {name!r} attacked other files (sha256 "
                       "differs)")
            elif model in present:
                why = f"no {model} attack within the budgets ({', '.join(format_budget(e) for e in budgets)})"
            elif model in ("surrogate", "adaptive"):
                why = f"no {model} attack against this guard's files in the table"
            else:
                why = f"no {model} attack in the table"
            if model in ("surrogate", "adaptive", "query"):
                why += "; attack them with `logitguard-produce attack-defenses` (docs/threat-models.md)"
            self.unmeasured[model] = why
        return self

    # -- checking -----------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def needs_noise(self) -> bool:
        return self.num_queries > 0

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
        self._check_schema(table)
        decision = self.check(table.logits, table.noisy_logits if self.needs_noise else None)
        frame = pd.DataFrame({"split": table.split, "sample_id": table.sample_id, "attack": table.attack,
                              **decision._asdict()})
        frame["abstained"] = frame["label"] == ABSTAIN
        return frame

    def defend_table(self, table: LogitTable) -> LogitTable:
        """`table` with ``pred`` (null where rejected) and ``flagged`` (`GatedDefense.defend_table`), after
        checking that the table has the classes and noise queries this guard expects."""
        self._check_schema(table)
        return self.defense.defend_table(table)

    def defend_path(self, path: str | os.PathLike, out: str | os.PathLike, *, split: str | None = None,
                    partition_by: tuple[str, ...] | None = ("split", "attack"), overwrite: bool = False,
                    batch_rows: int | None = None) -> dict[str, Any]:
        """`defend_table` on every row of the table at `path`, streamed into `out`
        (`logitguard.engines.stream.defend_path`, which the CLI calls directly)."""
        from ..engines.stream import defend_path

        return defend_path(self, path, out, split=split, partition_by=partition_by, overwrite=overwrite,
                           batch_rows=batch_rows)

    def _check_schema(self, table: LogitTable) -> None:
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
        """JSON-ready description: input schema, policy, threshold, achieved FPR, threat figures, provenance."""
        detector = self.defense.detector
        corrector = self.defense.corrector
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "classes": self.class_names, "num_classes": self.num_classes, "num_queries": self.num_queries,
            "noise": self.noise, "on_flag": self.defense.on_flag,
            "detector": None if detector is None else {
                "kind": detector.kind, "params": detector.get_params(), "threshold": detector.threshold_,
                "fpr": detector.fpr, "achieved_fpr": detector.achieved_fpr_,
                **_fpr_interval(detector.achieved_fpr_, len(detector.calibration_scores_)),
                "calibration_rows": len(detector.calibration_scores_)},
            "corrector": None if corrector is None else _corrector_name(corrector),
            "threat": fill_intervals(self.threat), "unmeasured": self.unmeasured, "provenance": self.provenance,
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
            parts.insert(1, f"corrector={_corrector_name(self.defense.corrector)['name']!r}")
        return f"Guard({', '.join(parts)})"


def table_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a table's Parquet files (relative names and contents, in sorted order)."""
    path = Path(path)
    files = [path] if path.is_file() else [Path(p) for p in table_files(path)]  # the files the reader reads
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        digest.update(bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


# -- helpers ----------------------------------------------------------------------------------------


def _open(table: LogitTable | str | os.PathLike) -> tuple[dict[str, Any], LogitTable]:
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


def _corrector_name(corrector: Any) -> dict[str, Any]:
    estimator = getattr(corrector, "odds", corrector)
    name = {"LogitCorrector": "corrector", "SVMCorrector": "svm"}.get(type(estimator).__name__, "odds")
    return {"name": name, "params": estimator.get_params()}


def _provenance(source: dict[str, Any], table: LogitTable, settings: dict[str, Any]) -> dict[str, Any]:
    import sklearn

    from .. import __version__

    return {**source, "dataset": table.metadata.get("dataset"), "model": table.metadata.get("model"),
            "settings": settings, "logitguard": __version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}


def _fpr_interval(fpr: float, rows: int) -> dict[str, float]:
    """``achieved_fpr_low`` / ``_high``: the exact 95% binomial interval of the FPR over the calibration rows."""
    from ..evaluation.intervals import binomial_interval

    low, high = binomial_interval(round(fpr * rows), rows)
    return {"achieved_fpr_low": float(low), "achieved_fpr_high": float(high)}


def format_info(info: dict[str, Any]) -> str:
    """Plain text of `Guard.info`: input, policy, detector and corrector, threat figures, provenance."""
    from ..evaluation.intervals import with_interval
    from ..evaluation.threat import format_threat_models
    from ..report.summary import percent

    detector, corrector = info["detector"], info["corrector"]
    noise = info.get("noise") or {}
    recipe = ", ".join(f"{q['kind']}:{q['scale']:g}" for q in noise.get("recipe", [])) or "-"
    lines = [
        f"input: logits of {info['num_classes']} classes ({', '.join(info['classes'])})",
        f"noise queries: {info['num_queries']}" + (f" (recipe {recipe})" if info["num_queries"] else " (none needed)"),
        f"on_flag: {info['on_flag']}",
        "detector: none (every row goes to the corrector)" if detector is None else
        f"detector: {detector['kind']}, threshold {detector['threshold']:.4g}, target FPR {percent(detector['fpr'])}, "
        f"achieved {with_interval(detector, 'achieved_fpr')} on {detector['calibration_rows']} clean calibration rows",
        f"corrector: {'none' if corrector is None else corrector['name']}",
        "",
    ]
    if info["threat"]:
        frame = pd.DataFrame(info["threat"]).astype({"harm": float})
        lines.append(format_threat_models(frame))
    for model, why in info["unmeasured"].items():
        lines.append(f"not measured: {model}: {why}")
    prov = info["provenance"]
    source = prov.get("table") or "an in-memory table"
    digest = prov.get("table_sha256") or prov.get("logits_sha256") or ""
    lines += ["", f"provenance: fitted on {source} (sha256 {digest[:12]}…), logitguard {prov.get('logitguard')}, "
                  f"{prov.get('created')}"]
    return "\n".join(lines)
