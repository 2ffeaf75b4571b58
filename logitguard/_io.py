"""Safe file output: every file logitguard writes goes through `atomic_output`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
