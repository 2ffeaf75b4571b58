"""File transactions: every file and directory logitguard writes goes through this module.

- `atomic_output`: one file, written to a temporary sibling and renamed into place. Readers never see a
  half-written file; the file gets the permissions the umask allows (``0666 & ~umask``).
- directory outputs (`StagedDirectory`, `staged_output`) are `logitguard.files.staging`'s.
- `OutputLock`: one writer per target. A second run to the same target refuses instead of interleaving;
  the lock is an ``flock`` on a hidden sibling file, so the OS releases it when a run is killed.
- `claim_output` / `check_writable`: what a command checks before long work (the location is writable,
  no other run holds it, nothing is overwritten without ``--force``).

Temporary entries are hidden siblings named ``.<target>.<kind>-<pid>-<host>-<random>``; entries of a run
that no longer exists (killed) are removed by the next run that writes the same target.

Saved arrays (`save_arrays`, the defenses' file format) live beside this module in `archive`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import LogitguardError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (documented in docs/tables.md)
    fcntl = None  # type: ignore[assignment]

_KINDS = ("tmp", "stage", "commit", "old")
# Temporary entries from another machine (a shared file system) are only removed once this old.
_FOREIGN_STALE_SECONDS = 24 * 3600
COMMIT_WAIT_SECONDS = 600.0  # how long a commit waits for another run's commit to the same target



def refuse_overwrite(paths: list[Path], overwrite: bool, *,
                     error: type[LogitguardError] = LogitguardError) -> None:
    """Raise `error` unless `overwrite` when any of `paths` exists: a user's file is never replaced silently."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise error(f"refusing to overwrite existing file(s): {shown}; pass overwrite=True (--force)")


def describe_os_error(exc: OSError) -> str:
    """``Permission denied: '/x/y'`` rather than ``[Errno 13] Permission denied: '/x/y'``."""
    text = exc.strerror or str(exc)
    names = [repr(str(f)) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{text}: {' -> '.join(names)}" if names else text


# ---------------------------------------------------------------------------------------------
# Names of temporary entries, and removing those of dead runs


def _host() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _tag() -> str:
    """``<pid>-<host>``: who owns a temporary entry (the pid changes in a forked child)."""
    return f"{os.getpid()}-{_host()}"


def _temp_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{_tag()}-"


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.({'|'.join(_KINDS)})-(\d+)-([0-9a-f]{{8}})-[^/]+")


def _owner_gone(pid: int, host: str, path: Path) -> bool:
    if host != _host():
        try:
            return time.time() - path.lstat().st_mtime > _FOREIGN_STALE_SECONDS
        except OSError:
            return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


def clean_stale(target: str | os.PathLike) -> None:
    """Remove temporary siblings of `target` left by runs that are gone (killed); restore an old output
    set aside by a commit that was killed before the new one was in place. Call with the target's lock held."""
    target = Path(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    pattern = _temp_pattern(target.name)
    stale = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and _owner_gone(int(match.group(2)), match.group(3), Path(entry.path)):
            stale.append((match.group(1), Path(entry.path)))
    # An old output set aside goes back first, before anything else is removed.
    for kind, path in sorted(stale, key=lambda s: s[0] != "old"):
        if kind == "old" and not os.path.lexists(target):
            os.rename(path, target)
        else:
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------------
# Permissions


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: str | os.PathLike, *, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 whatever the umask; give the entry what a plain open/mkdir would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


# ---------------------------------------------------------------------------------------------
# Checks before long work


def check_writable(target: str | os.PathLike, *, directory: bool = False,
                   error: type[LogitguardError] = LogitguardError) -> None:
    """Raise `error` unless `target` can be written: its nearest existing ancestor is a writable directory
    (probed by creating a file there) and an existing `target` is of the right kind (file or directory)."""
    target = Path(target)
    if target.is_dir() and not directory:
        raise error(f"cannot write {target}: it is a directory (expected a file name)")
    if directory and target.exists() and not target.is_dir():
        raise error(f"cannot write {target}: it exists and is not a directory")
    ancestor = target.absolute().parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f"cannot write {target}: {ancestor} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".logitguard-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise error(f"cannot write {target}: {ancestor} is not writable ({exc.strerror or exc})") from None


def claim_output(target: str | os.PathLike, overwrite: bool, *, directory: bool = False, merge: bool = False,
                 extra: Iterable[str | os.PathLike] = (),
                 error: type[LogitguardError] = LogitguardError) -> OutputLock:
    """Everything a command checks about its output before it starts work; returns the held lock.

    The location must be writable, no other run may be writing `target`, and an existing output (or any of
    `extra`, files written beside or, with `merge`, into it) is refused unless `overwrite`. A directory
    that is replaced as a whole (not `merge`) must hold nothing but a table. The lock is held until
    `release` (or the process ends), so a second run to the same target refuses at once, not after hours.
    """
    target = Path(target)
    check_writable(target, directory=directory, error=error)
    if directory:
        target = _directory_target(target, error)  # the same lock as the `StagedDirectory` that writes it
    target.absolute().parent.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(target, error=error)
    lock.acquire()
    try:
        if directory and merge:
            refuse_overwrite([Path(p) for p in extra], overwrite, error=error)
        elif directory:
            _refuse_directory(target, overwrite, error)
            if target.is_dir():
                _refuse_foreign(target, error)
        else:
            refuse_overwrite([target, *(Path(p) for p in extra)], overwrite, error=error)
    except BaseException:
        lock.release()
        raise
    return lock


def _refuse_directory(target: Path, overwrite: bool, error: type[LogitguardError]) -> None:
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise error(f"refusing to overwrite existing file(s): {target} (a directory); pass overwrite=True "
                    "(--force) to replace it as a whole")


# ---------------------------------------------------------------------------------------------
# One writer per target


class OutputLock:
    """An exclusive lock on writing `target`: ``flock`` on the hidden sibling ``.<name>.lock``.

    Re-entrant within a process (a command that claimed its output can write it); another process gets
    `error` at once, or after `wait` seconds. The OS drops the lock of a killed run. Acquiring it removes
    temporary entries of dead runs beside `target` (`clean_stale`).
    """

    _held: dict[str, list[int]] = {}  # lock file -> [fd, depth], this process

    def __init__(self, target: str | os.PathLike, *, wait: float = 0.0,
                 error: type[LogitguardError] = LogitguardError) -> None:
        target = Path(target).absolute()
        self.target = Path(os.path.realpath(target.parent)) / target.name  # one lock whatever the spelling
        self.path = self.target.parent / f".{self.target.name}.lock"
        self.wait = wait
        self.error = error
        self._depth = 0

    def acquire(self) -> OutputLock:
        key = str(self.path)
        held = self._held.get(key)
        if held is not None:
            held[1] += 1
            self._depth += 1
            return self
        fd = self._lock() if fcntl is not None else -1
        self._held[key] = [fd, 1]
        self._depth += 1
        clean_stale(self.target)
        return self

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        key = str(self.path)
        held = self._held[key]
        held[1] -= 1
        if held[1]:
            return
        del self._held[key]
        if held[0] >= 0:
            try:
                self.path.unlink()  # while still locked: a waiter that opened it sees a new inode and retries
            except FileNotFoundError:
                pass
            os.close(held[0])

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _lock(self) -> int:
        deadline = time.monotonic() + self.wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise self.error(f"another run is writing {self.target}{self._holder()}; wait for it to finish "
                                 f"or choose another output") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)  # the holder removed the file as we opened it: lock the new one

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (process {pid})" if pid.isdigit() else ""


# ---------------------------------------------------------------------------------------------
# Files


@contextmanager
def atomic_output(target: str | os.PathLike, *, overwrite: bool = True,
                  error: type[LogitguardError] = LogitguardError) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`, else delete it.

    Readers never see a half-written file, and a failed write leaves nothing behind. Holds `target`'s
    `OutputLock` meanwhile; with ``overwrite=False`` an existing `target` is refused (checked under the
    lock, so of two runs exactly one writes). The file gets ``0666 & ~umask``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(target, error=error):
        if not overwrite:
            refuse_overwrite([target], overwrite, error=error)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_temp_prefix(target, "tmp"))
        os.close(fd)
        try:
            _honour_umask(tmp)
            yield Path(tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _directory_target(target: Path, error: type[LogitguardError]) -> Path:
    """The real directory to replace: symlinks resolved (the link stays, its target is replaced); never the
    current directory or one above it (a process's own working directory cannot be swapped away)."""
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise error(f"cannot write a table directory over {target}: it is (or holds) the current directory; "
                    "choose a subdirectory")
    return resolved


def _refuse_foreign(target: Path, error: type[LogitguardError]) -> None:
    """Replacing a directory as a whole deletes it: only when it holds nothing but a table's Parquet files."""
    for root, dirs, names in os.walk(target):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and not name.endswith(".parquet"):
                raise error(f"refusing to replace {target}: it holds files that are not part of a table (e.g. "
                            f"{Path(root, name)}); choose another output")
