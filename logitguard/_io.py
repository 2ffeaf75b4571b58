"""Safe files: every file logitguard writes goes through `atomic_output`; array archives are read
without unpickling."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LogitguardError


def refuse_overwrite(paths: list[Path], overwrite: bool, *,
                     error: type[LogitguardError] = LogitguardError) -> None:
    """Raise `error` unless `overwrite` when any of `paths` exists: a user's file is never replaced silently."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise error(f"refusing to overwrite existing file(s): {shown}; pass overwrite=True (--force)")


@contextmanager
def atomic_output(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`, else delete it.

    Readers never see a half-written file, and a failed write leaves nothing behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_arrays(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray], *, overwrite: bool) -> Path:
    """Write an ``.npz`` of plain arrays plus a JSON `header` (must hold ``format``), atomically."""
    refuse_overwrite([path], overwrite)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, header=np.array(json.dumps(header)), **{f"a_{k}": np.asarray(v) for k, v in arrays.items()})
    return path


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
