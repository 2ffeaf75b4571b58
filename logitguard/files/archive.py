"""The defenses' file format: plain arrays plus a JSON header in an ``.npz``, never a pickle.

`save_arrays` writes the same bytes for the same content (fixed zip timestamps), atomically; `load_arrays`
reads with ``allow_pickle=False`` and refuses any other file with a `LogitguardError`; `file_sha256` is the
digest provenance records (pipelines, guards, the producer's attack partitions).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LogitguardError
from .transactions import atomic_output, refuse_overwrite

__all__ = ["check_format_version", "file_sha256", "load_arrays", "read_header", "save_arrays"]

def check_format_version(version: Any, reads: int, where: str) -> int:
    """A saved file's ``format_version``: refused (`LogitguardError`, naming `where`) unless a positive integer
    no newer than `reads`, the version this logitguard reads."""
    if not isinstance(version, int) or version < 1:
        raise LogitguardError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > reads:
        raise LogitguardError(f"{where}: written by a newer logitguard (format_version {version}, this one "
                              f"reads {reads}); upgrade logitguard")
    return version


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of the file at `path` (read in 1 MiB blocks)."""
    path = Path(path)
    if not path.is_file():
        raise LogitguardError(f"no such file: {path}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_arrays(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray], *, overwrite: bool) -> Path:
    """Write an ``.npz`` of plain arrays plus a JSON `header` (must hold ``format``), atomically.

    The archive is deterministic: the same header and arrays give the same bytes (fixed zip timestamps).
    """
    path = Path(path)
    refuse_overwrite([path], overwrite)
    members = {"header": np.array(json.dumps(header)), **{f"a_{k}": np.asarray(v) for k, v in arrays.items()}}
    with atomic_output(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        _write_npz(f, members)
    return path


def _write_npz(f: Any, members: dict[str, np.ndarray]) -> None:
    """`numpy.savez` with a fixed timestamp per member, so equal content gives equal bytes."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in members.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def load_arrays(path: Path, fmt: str, what: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a `save_arrays` file whose header's ``format`` is `fmt`; never unpickles (allow_pickle=False).

    Raises `LogitguardError` naming `what` ("detector", …) when the file is missing or is something else.
    """
    if not path.is_file():
        raise LogitguardError(f"no such {what} file: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = json.loads(str(archive["header"]))
            arrays = {k[2:]: archive[k] for k in archive.files if k.startswith("a_")}
    except Exception as exc:  # zip, key, JSON and pickle refusals all mean the same thing here
        raise LogitguardError(f"{path}: not a logitguard {what} file ({type(exc).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise LogitguardError(f"{path}: not a logitguard {what} file")
    return header, arrays


def read_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a `save_arrays` file, or None for any other file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = json.loads(str(archive["header"]))
    except Exception:
        return None
    return header if isinstance(header, dict) else None
