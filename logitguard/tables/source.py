"""Which rows of a table on disk a command reads: `TableSource`, the selection made once.

The caller (the CLI, from ``--split``) builds one ``TableSource(path, split="test")`` and hands it on; the
readers (`read_table`, `iter_batches`, `read_keys`, `row_counts`, the streamed and Ray engines' readers) are
the one place its selection is applied. A plain path wherever a source is taken means the whole table.
Functions that take rows in memory (a `LogitTable`, `RowKeys`) use every row they are given: select first
(``table.select(split="train")``); fits and evaluations refuse rows of several splits (`require_one_split`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import TableError

__all__ = ["TableSource"]


@dataclass(frozen=True)
class TableSource:
    """The rows of the table at `path` of one `split` (None: every split) and of `attacks` (None: every attack),
    e.g. ``read_table(TableSource("data/fashion-mnist", split="test"))``; ``str(source)`` is the path."""

    path: Path
    split: str | None = None
    attacks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.attacks is not None:
            object.__setattr__(self, "attacks", (self.attacks,) if isinstance(self.attacks, str) else tuple(self.attacks))

    @classmethod
    def of(cls, source: TableSource | str | os.PathLike, *, split: str | None = None,
           attacks: str | Sequence[str] | None = None) -> TableSource:
        """`source` as a `TableSource` (a path: the whole table), narrowed by `split` and `attacks` (`narrow`)."""
        return (source if isinstance(source, TableSource) else cls(source)).narrow(split=split, attacks=attacks)

    def narrow(self, *, split: str | None = None, attacks: str | Sequence[str] | None = None) -> TableSource:
        """The rows of this source that are also of `split` and of `attacks` (None: no further selection).

        A `split` other than the source's own is refused (`TableError`): no row could match both."""
        if split is not None and self.split is not None and split != self.split:
            raise TableError(f"{self.path}: the source is split {self.split!r}; it cannot be narrowed to {split!r}")
        if attacks is not None:
            attacks = (attacks,) if isinstance(attacks, str) else tuple(attacks)
            if self.attacks is not None:
                attacks = tuple(a for a in attacks if a in self.attacks)
        if (split is None or split == self.split) and attacks in (None, self.attacks):
            return self
        return replace(self, split=self.split if split is None else split,
                       attacks=self.attacks if attacks is None else attacks)

    def __str__(self) -> str:
        return str(self.path)
