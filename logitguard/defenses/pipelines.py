"""Pipeline manifests: named defenses (detector, corrector, on_flag) saved as files, in one JSON file.

```json
{"format": "logitguard.Pipelines", "format_version": 1,
 "pipelines": {"none": {},
               "corrector": {"corrector": "pgd.npz"},
               "ln-odds": {"detector": "learned-noisy.npz", "corrector": "odds-logistic.npz", "on_flag": "correct"}}}
```

Paths are relative to the manifest's folder, so a folder of defenses moves as one. A detector file used
as ``corrector`` must be an odds detector (its own correction rule; see `load_corrector`). This module
stays free of torch at import: files are loaded by `PipelineSpec.build`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_output, check_format_version, file_sha256, refuse_overwrite, staged_output
from .gated import ON_FLAG, GatedDefense, check_policy
from ..errors import LogitguardError
from ..tables import LogitTable, require_one_split

FORMAT = "logitguard.Pipelines"
FORMAT_VERSION = 1
MANIFEST = "defenses.json"  # a folder of defenses' manifest
_ROLES = ("detector", "corrector")
_KEYS = (*_ROLES, "on_flag")

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "PipelineSpec", "load_pipelines", "manifest_provenance",
           "refit_detectors", "save_pipelines"]


@dataclass(frozen=True)
class PipelineSpec:
    """One named pipeline of a manifest: its files (absolute paths) and its `on_flag` policy.

    `root` is the manifest's folder; file names in `files` and `fingerprints` are relative to it.
    """

    name: str
    detector: Path | None = None
    corrector: Path | None = None
    on_flag: str = "correct"
    root: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_policy(self.detector is not None, self.corrector is not None, self.on_flag)

    def build(self) -> GatedDefense:
        """Load the files into a `GatedDefense` (the bare model when the pipeline names no file)."""
        from .gated import load_corrector
        from .detectors import load_detector

        detector = None if self.detector is None else load_detector(self.detector)
        corrector = None if self.corrector is None else load_corrector(self.corrector)
        return GatedDefense(detector, corrector, on_flag=self.on_flag)

    def files(self) -> dict[str, Path]:
        """``{name relative to the manifest folder: path}`` of the files this pipeline loads (a file used
        as detector and corrector appears once)."""
        out: dict[str, Path] = {}
        for path in (self.detector, self.corrector):
            if path is not None:
                out[_relative_name(path, self.root)] = path
        return out

    def fingerprints(self) -> dict[str, str]:
        """``{file name: sha256 hex}`` of `files`: what an attacker who had these files had (threat metadata
        ``defense_files``)."""
        return {name: file_sha256(path) for name, path in self.files().items()}


def load_pipelines(path: str | os.PathLike) -> dict[str, PipelineSpec]:
    """Read a pipeline manifest; every named file must exist. Raises `LogitguardError` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise LogitguardError(f"no such pipeline manifest: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LogitguardError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LogitguardError(f"{path}: not a logitguard pipeline manifest (expected \"format\": \"{FORMAT}\")")
    check_format_version(doc.get("format_version"), FORMAT_VERSION, str(path))
    entries = doc.get("pipelines")
    if not isinstance(entries, dict) or not entries:
        raise LogitguardError(f"{path}: \"pipelines\" must be a non-empty object of name: pipeline")
    root = path.parent.resolve()
    specs = {}
    for name, entry in entries.items():
        where = f"{path}: pipeline {name!r}"
        if not isinstance(entry, dict):
            raise LogitguardError(f"{where} must be an object with keys {', '.join(_KEYS)}")
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise LogitguardError(f"{where} has unknown key(s) {unknown}; allowed: {', '.join(_KEYS)}")
        files = {}
        for role in _ROLES:
            value = entry.get(role)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise LogitguardError(f"{where}: {role} must be a file name, got {value!r}")
            file = root / value
            if not file.is_file():
                raise LogitguardError(f"{where}: no such {role} file: {file}")
            files[role] = file
        on_flag = entry.get("on_flag", "correct")
        if on_flag not in ON_FLAG:
            raise LogitguardError(f"{where}: unknown on_flag {on_flag!r}; choose from {', '.join(ON_FLAG)}")
        try:
            specs[name] = PipelineSpec(name, files.get("detector"), files.get("corrector"), on_flag, root=root)
        except LogitguardError as exc:
            raise LogitguardError(f"{where}: {exc}") from None
    return specs


def manifest_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``provenance`` a manifest was saved with (`save_pipelines`), None when it has none."""
    path = Path(path)
    load_pipelines(path)  # refuses what is not a manifest
    value = json.loads(path.read_text(encoding="utf-8")).get("provenance")
    if value is not None and not isinstance(value, dict):
        raise LogitguardError(f"{path}: \"provenance\" must be an object, got {value!r}")
    return value


def save_pipelines(
    path: str | os.PathLike,
    pipelines: Mapping[str, Mapping[str, Any] | PipelineSpec],
    *,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a manifest atomically: ``{name: {"detector": path, "corrector": path, "on_flag": policy}}``
    (any key optional) or ``{name: PipelineSpec}``.

    `provenance` (JSON-serialisable): how the files were made, stored under the manifest's ``provenance`` key
    (e.g. the rounds of an adversarial fit) and read back by `manifest_provenance`; readers ignore it.

    File paths are ordinary paths (relative ones to the current directory, as everywhere in Python) and
    are stored relative to the manifest's folder. Refuses to replace an existing manifest unless
    `overwrite`. Returns `path`.
    """
    path = Path(path)
    refuse_overwrite([path], overwrite)
    root = path.parent.resolve()
    entries: dict[str, dict[str, str]] = {}
    for name, entry in pipelines.items():
        if isinstance(entry, PipelineSpec):
            entry = {"detector": entry.detector, "corrector": entry.corrector, "on_flag": entry.on_flag}
        if not isinstance(name, str) or not name:
            raise LogitguardError(f"pipeline names must be non-empty strings, got {name!r}")
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise LogitguardError(f"pipeline {name!r} has unknown key(s) {unknown}; allowed: {', '.join(_KEYS)}")
        on_flag = entry.get("on_flag") or "correct"
        roles = {role: entry[role] for role in _ROLES if entry.get(role) is not None}
        try:
            check_policy("detector" in roles, "corrector" in roles, on_flag)
        except LogitguardError as exc:
            raise LogitguardError(f"pipeline {name!r}: {exc}") from None
        out = {role: _relative_name(Path(value), root) for role, value in roles.items()}
        if roles:
            out["on_flag"] = on_flag
        entries[name] = out
    doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "pipelines": entries}
    if provenance is not None:
        doc["provenance"] = dict(provenance)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def _relative_name(path: Path, root: Path | None) -> str:
    """`path` relative to the manifest folder `root` (its bare name when there is no manifest)."""
    if root is None:
        return Path(path).name
    return Path(os.path.relpath(Path(path).resolve(), root)).as_posix()


def refit_detectors(pipelines: Mapping[str, PipelineSpec], table: LogitTable, out: str | os.PathLike, *,
                    attacks: Sequence[str], overwrite: bool = False) -> Path:
    """Refit every detector of `pipelines` on the rows of `table` (one split: the ``train`` rows) from the
    attacked partitions `attacks`, and write the pipelines to the folder `out` with their manifest.

    Each detector keeps its kind and parameters: an unfitted copy of the saved one learns from the clean rows
    and `attacks`, and recalibrates its threshold to its target FPR on its calibration hold-out
    (`Detector.fit_table`). A file used as a corrector only is copied unchanged. This is how an adversarial
    fit's rounds refit whatever detector kind they attack (`producers.threat.adversarial_fit`). Files keep
    their names; refuses two different files of one name. Returns ``out/defenses.json``.
    """
    from sklearn.base import clone

    from .detectors import load_detector

    require_one_split(table, "refitting detectors", hint="train")
    out = Path(out)
    sources: dict[str, Path] = {}
    refit: set[str] = set()
    for spec in pipelines.values():
        for role in _ROLES:
            path = getattr(spec, role)
            if path is None:
                continue
            name, source = Path(path).name, Path(path).resolve()
            if sources.setdefault(name, source) != source:
                raise LogitguardError(f"two different files are named {name!r}; refitting writes them to one folder")
            if role == "detector":
                refit.add(name)
    refuse_overwrite([out / name for name in (*sorted(sources), MANIFEST)], overwrite)
    # Written beside `out` and added to it in one step: `out` never holds some new files with an old manifest.
    with staged_output(out, overwrite=overwrite) as stage:
        for name, source in sources.items():
            if name in refit:
                clone(load_detector(source)).fit_table(table, attacks=list(attacks)).save(stage / name)
            else:
                shutil.copyfile(source, stage / name)
        specs = {key: {"detector": spec.detector and stage / Path(spec.detector).name,
                       "corrector": spec.corrector and stage / Path(spec.corrector).name, "on_flag": spec.on_flag}
                 for key, spec in pipelines.items()}
        save_pipelines(stage / MANIFEST, specs)
    return out / MANIFEST
