"""Directory outputs: a partitioned table or a resumable export built in a sibling staging directory and
put in place in one step (an atomic exchange of the two directories where the OS has one, Linux's
``renameat2(RENAME_EXCHANGE)``). The target always holds either the complete old output or the new one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import LogitguardError
from .transactions import (_KINDS, COMMIT_WAIT_SECONDS, OutputLock, _directory_target, _honour_umask, _refuse_directory,
                           _refuse_foreign, _remove, _temp_prefix, check_writable, current_umask)

__all__ = ["StagedDirectory", "link_or_copy", "staged_output"]


class StagedDirectory:
    """A directory output built beside `target` and put in place in one step by `commit`.

    Without `resume_key` the staging directory is private to this run and removed on `discard`. With a
    key it is ``.<name>.resume-<key>``, kept when the run fails or is killed so that a rerun with the same
    key finds what was already written (resume); two runs with the same key cannot stage at once.

    `commit` builds the new tree from hard links (no data is copied): with ``replace=True`` only the
    staged files, otherwise the current `target` plus the staged files; then swaps it with `target`.
    """

    def __init__(self, target: str | os.PathLike, *, resume_key: str | None = None,
                 error: type[LogitguardError] = LogitguardError) -> None:
        self.given = Path(target)
        self.target = _directory_target(self.given, error)
        self.error = error
        parent = self.target.parent
        check_writable(self.target, directory=True, error=error)
        parent.mkdir(parents=True, exist_ok=True)
        self._lock: OutputLock | None = None
        if resume_key is None:
            self.path = Path(tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(self.target, "stage")))
        else:
            self.path = parent / f".{self.target.name}.resume-{resume_key}"
            self._lock = OutputLock(self.path, error=error).acquire()
            self.path.mkdir(exist_ok=True)
        _honour_umask(self.path, directory=True)

    def commit(self, files: Iterable[str] | None = None, *, replace: bool = False, overwrite: bool = False,
               check: Callable[[], None] | None = None, wait: float = COMMIT_WAIT_SECONDS) -> list[Path]:
        """Put the staged `files` (paths relative to the stage; default: every staged file) in place.

        Under `target`'s lock (waiting up to `wait` seconds for another commit): `check()` runs first (it may
        raise), an existing file is replaced only with `overwrite`, and ``replace=True`` replaces the whole
        old output (only with `overwrite`, and only when it looks like a table: Parquet files). Returns the
        committed files' final paths. The staging directory is removed.
        """
        files = sorted(_staged_files(self.path) if files is None else {str(Path(f)) for f in files})
        with OutputLock(self.target, wait=wait, error=self.error):
            if check is not None:
                check()
            exists = self.target.is_dir()
            if os.path.lexists(self.target) and not exists:
                raise self.error(f"cannot write {self.target}: it exists and is not a directory")
            if replace and exists:
                _refuse_directory(self.target, overwrite, self.error)
                _refuse_foreign(self.target, self.error)
            new = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=_temp_prefix(self.target, "commit")))
            try:
                os.chmod(new, stat.S_IMODE(self.target.stat().st_mode) if exists else 0o777 & ~current_umask())
                if exists and not replace:
                    _link_tree(self.target, new)
                for rel in files:
                    dest = new / rel
                    if os.path.lexists(dest):
                        if not overwrite:
                            raise self.error(f"refusing to overwrite existing file {self.target / rel}; "
                                             "pass overwrite=True (--force)")
                        dest.unlink()
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    link_or_copy(self.path / rel, dest)
                old = _swap_into_place(new, self.target)
            except BaseException:
                _remove(new)
                raise
            if old is not None:
                _remove(old)
        self.discard()
        return [self.given / rel for rel in files]

    def discard(self) -> None:
        """Remove the staging directory and release its lock."""
        _remove(self.path)
        self.close()

    def close(self) -> None:
        """Release the stage's lock; a resumable stage stays for the next run."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


@contextmanager
def staged_output(target: str | os.PathLike, *, overwrite: bool, replace: bool = False,
                  error: type[LogitguardError] = LogitguardError) -> Iterator[Path]:
    """Yield an empty staging directory for the directory output `target`; when the block succeeds, its
    files are committed in one step (`StagedDirectory.commit`), else it is removed and `target` is untouched.

    ``replace=True``: the staged files replace the whole old output (refused without `overwrite` when it
    exists and is not empty); otherwise they are added to it (an existing file refused without `overwrite`).
    `target`'s lock is held throughout: a second run to it raises `error` at once.
    """
    stage = StagedDirectory(target, error=error)
    try:
        with OutputLock(stage.target, error=error):
            if replace:
                _refuse_directory(stage.target, overwrite, error)
            yield stage.path
            stage.commit(replace=replace, overwrite=overwrite, wait=0)
    except BaseException:
        stage.discard()
        raise


def _staged_files(stage: Path) -> list[str]:
    out = []
    for root, dirs, names in os.walk(stage):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [str(Path(root, n).relative_to(stage)) for n in names if not n.startswith(".")]
    return out


def link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link `source` as `dest` (copy where the file system has no hard links)."""
    if source.is_symlink():
        os.symlink(os.readlink(source), dest)
        return
    try:
        os.link(source, dest)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
            raise
        shutil.copy2(source, dest)


def _link_tree(source: Path, dest: Path) -> None:
    """Recreate `source`'s tree under the existing `dest` with hard links (our temporary entries left out)."""
    for root, dirs, names in os.walk(source):
        here = Path(root)
        into = dest / here.relative_to(source)
        for d in list(dirs):
            if (here / d).is_symlink():
                os.symlink(os.readlink(here / d), into / d)
                dirs.remove(d)
            elif not _is_ours(d):
                (into / d).mkdir()
                shutil.copymode(here / d, into / d)
            else:
                dirs.remove(d)
        for name in names:
            if not _is_ours(name):
                link_or_copy(here / name, into / name)


def _is_ours(name: str) -> bool:
    return name.endswith(".lock") and name.startswith(".") or bool(
        re.fullmatch(rf"\..+\.({'|'.join(_KINDS)})-\d+-[0-9a-f]{{8}}-[^/]+", name))


def _swap_into_place(new: Path, target: Path) -> Path | None:
    """Make `new` the directory at `target`; return where the old one now is (to delete), if any.

    An atomic exchange where the OS offers one; otherwise the old directory is first renamed aside
    (``.<name>.old-…``; a killed run's is put back by `clean_stale`) and `new` renamed into place.
    """
    if not os.path.lexists(target):
        os.rename(new, target)
        return None
    if _exchange(new, target):
        return new
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target, "old")))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            func = libc.renameat2
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            func.restype = ctypes.c_int
            _renameat2 = (func, ctypes)
        except (OSError, AttributeError):
            pass
    if not _renameat2:
        return False
    func, ctypes = _renameat2
    at_fdcwd, rename_exchange = -100, 2
    if func(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
