"""What an export finds on disk and where it stages: the partitions of one run are added to ``OUT`` in one step.

A run stages its partitions beside ``OUT`` (`ExportStage`) and commits them together at the end, so ``OUT``
never holds part of a run. A rerun skips partitions ``OUT`` already holds (refusing ones made with other
settings, `partition_mismatch`) and resumes from the ones an interrupted run staged with the same settings;
`check_existing` refuses to add to a table whose files would disagree with what the export writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitguard.files import StagedDirectory
from logitguard.tables import METADATA_KEY, LogitTable, write_table

from ..errors import ProducerError


class ExportStage:
    """The partitions of one export run, staged beside `out` and added to it together at the end.

    Staging is ``.<out>.resume-<key>`` (`logitguard.files.StagedDirectory`): a run that fails or is killed
    leaves `out` as it was and its finished partitions there; a rerun with the same key resumes from
    them, but only from partitions written with the same metadata (parameters, model, noise, …) and the
    same samples; anything else is redone. Two runs with the same key cannot stage at once. `commit`
    puts every staged partition of this run into `out` in one step (`out` holds either none or all).
    """

    def __init__(self, out: str | Path, key: str) -> None:
        self.out = Path(out)
        self.stage = StagedDirectory(self.out, resume_key=key, error=ProducerError)
        self.files: list[str] = []

    def classify(self, rel: str, metadata: dict[str, Any], name: str, rows: np.ndarray, *,
                 features: bool | None = None, insen: bool | None = None, external: bool | None = None) -> str:
        """``done``: `out` holds the partition (raises when it was made differently); ``staged``: an
        interrupted run staged it with the same settings; ``todo``: it must be (re)computed."""
        final = self.out / rel
        if final.exists():
            problem = partition_mismatch(final, metadata, name, rows, features=features, insen=insen,
                                         external=external, strict=False)
            if problem:
                raise ProducerError(f"{final} already exists and {problem}; use another --out (or alias)")
            return "done"
        staged = self.stage.path / rel
        if staged.exists():
            if partition_mismatch(staged, metadata, name, rows, features=features, insen=insen,
                                  external=external) is None:
                self.files.append(rel)
                return "staged"
            staged.unlink()  # an interrupted run with other settings: redo it
        return "todo"

    def write(self, rel: str, table: LogitTable) -> None:
        write_table(table, self.stage.path / rel, overwrite=True)
        self.files.append(rel)

    def commit(self, check=None) -> list[Path]:
        """Add every staged partition to `out` at once (after `check()`, under `out`'s lock)."""
        if not self.files:
            self.stage.discard()
            return []
        return self.stage.commit(self.files, check=check)

    def __enter__(self) -> ExportStage:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.stage.path.exists() and not any(p.is_file() for p in self.stage.path.rglob("*.parquet")):
            self.stage.discard()  # nothing to resume from
        else:
            self.stage.close()  # keeps what was staged, for a rerun


def partition_mismatch(file: Path, metadata: dict[str, Any], name: str, rows: np.ndarray, *,
                       features: bool | None = None, insen: bool | None = None, external: bool | None = None,
                       strict: bool = True) -> str | None:
    """How the partition file `file` differs from what an export would write there, or None.

    Compared: the table metadata this export writes (``attacks`` and ``threat`` by the partition `name`),
    the sample ids (`rows`) and, when given, whether it has ``features``, ``insen`` and the ``external_*``
    columns. Without `strict`, a key the file
    lacks is not a difference (files from earlier versions).
    """
    try:
        parquet = pq.ParquetFile(file, page_checksum_verification=True)
        theirs = json.loads((parquet.schema_arrow.metadata or {}).get(METADATA_KEY) or b"{}")
        ids = parquet.read(columns=["sample_id"]).column("sample_id").to_numpy()
        names = parquet.schema_arrow.names
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        return f"cannot be read ({exc})"
    for key, value in json.loads(json.dumps(metadata)).items():
        old = theirs.get(key)
        if key in ("attacks", "threat"):
            value, old = (value or {}).get(name), (old or {}).get(name)
        if key == "threat" and isinstance(old, dict):  # what only running the attack tells (the suite's record)
            old = {k: v for k, v in old.items() if k not in ("broken_by", "indicators")}
        if (old is not None or strict) and old != value:
            return f"was written with {key} {old!r}; this export would write {value!r}"
    for wanted, column, what in ((features, "features", "features"), (insen, "insen", "insen statistics"),
                                 (external, "external_score", "an external system's columns")):
        if wanted is not None and (column in names) != wanted:
            return f"was written {'with' if column in names else 'without'} {what}"
    if not np.array_equal(np.sort(ids), np.sort(rows)):
        return f"holds {len(ids)} rows of other samples than the {len(rows)} this export selects " \
               "(another --seed, sample count or --max-samples)"
    return None



def check_existing(out: Path, base_meta: dict[str, Any], partitions: dict[str, dict[str, Any]]) -> None:
    """Refuse to add to a table under `out` whose files would disagree with what this export writes.

    Partitions already there are skipped (resume), so the check is on metadata: every shared key must be
    equal (the reader refuses a table whose files disagree), and an attack already there must have been
    run with the same parameters and threat model.
    """
    if not out.is_dir():
        return
    mine = json.loads(json.dumps(base_meta))  # as it will read back
    for file in sorted(out.glob("split=*/attack=*/*.parquet")):
        try:
            raw = (pq.read_schema(file).metadata or {}).get(METADATA_KEY)
            theirs = json.loads(raw) if raw else {}
        except (OSError, ValueError) as exc:
            raise ProducerError(f"{out} holds an unreadable table file {file}: {exc}") from None
        for key, value in mine.items():
            if key in theirs and theirs[key] != value:
                raise ProducerError(f"{out} already holds a table with a different {key!r} ({file} has "
                                    f"{theirs[key]!r}, this export would write {value!r}); use another --out")
        for name, meta in partitions.items():
            for key in ("attacks", "threat"):
                new, old = json.loads(json.dumps(meta.get(key, {}).get(name))), theirs.get(key, {}).get(name)
                if new is not None and old is not None and new != old:
                    raise ProducerError(f"{out} already holds attack {name!r} with {key} {old!r} ({file}); this "
                                        f"export would write {new!r}; use another alias or --out")

