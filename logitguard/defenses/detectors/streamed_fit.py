"""Fitting a detector from a table on disk, streamed (`StreamedFit.fit_path`), without loading the table.

`Detector` inherits this: `fit_path` reads the rows in batches, in a few passes, and learns from streamed sums
or from (a sample of) the rows (`_fit_stream`, which detectors override where they learn from sums, and
`_stream_sample`, bounded by `stream_fit_bytes`); detectors with an `input_column` read the rows they learn
from with `read_table` and fit in memory.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ...errors import LogitguardError
from ...tables import CLEAN, TableSource, holdout_mask, require_one_split
from ..decision import successful_attack

if TYPE_CHECKING:
    from .base import Detector


class StreamedFit:
    """`Detector.fit_path` and its hooks (a base class of `Detector`; every other method they call is Detector's)."""

    # A streamed fit holds the rows it learns from (`_fit_stream`) up to about this many bytes of features.
    stream_fit_bytes: ClassVar[int] = 256 << 20

    def fit_path(self, source: TableSource | str | os.PathLike, *, attacks: list[str] | None = None,
                 batch_rows: int | None = None, max_rows: int | None = None) -> Detector:
        """`fit_table(read_table(source), attacks=attacks)` without loading the table: `source` is a `TableSource`
        (``TableSource(path, split="train")``) or a path (the whole table); rows of several splits are refused.

        The rows are read in batches, in a few passes, so memory depends on the batch size and `max_rows`,
        not on the table. The threshold is calibrated on the scores of every calibration row, exactly as
        `fit`. What the detector learns comes from streamed sums where it is one (the odds test's class
        moments: equal up to float rounding), and from the rows themselves where it needs them (the learned
        detectors' network; the odds test's logistic rule and per-pair thresholds): all of them when there
        are at most `max_rows` (default: about `stream_fit_bytes` of features; 11,184 rows at C=1000 for
        ``learned``), else a uniform sample of `max_rows` drawn with the detector's seed (0 if it has none),
        in table order. Up to that size the result is the in-memory one.

        Detectors with an `input_column` read the rows they learn from with `read_table` (the clean rows, plus
        the chosen attacks' rows for supervised ones; the logits, that column and, where needed, the noise
        queries) and fit in memory: `batch_rows` and `max_rows` do not apply (``kdensity`` bounds its own
        memory with ``max_per_class``).
        """
        from ...tables.stream import TableStream
        from ...tables import noise_queries, pair_rows, read_keys, table_columns

        self._check_params()
        path = TableSource.of(source)
        keys = read_keys(path)
        require_one_split(keys, f"fitting a {self.kind} detector", hint="train")
        if self.input_column is not None:
            return self._fit_path_in_memory(path, keys, attacks)
        chosen = self._attacks_to_fit(keys.attacks, attacks, has_noise="noisy_logits" in table_columns(path))
        wanted = [CLEAN, *dict.fromkeys(chosen)]
        stream = TableStream(path, attacks=wanted, columns=["noisy_logits"] if self.needs_noise else [],
                             batch_rows=batch_rows, keys=keys.select(attacks=wanted))
        rows = stream.keys
        # The rows `fit_table` passes to `fit`, as row numbers of the stream: clean rows, then each attack's.
        if self.successful_attacks_only:
            (model_label,) = stream.collect(np.arange(len(rows)), lambda z, _: (z.argmax(axis=1),))
            parts = [np.flatnonzero(rows.attack == CLEAN)]
            for attack in chosen:
                clean, attacked = pair_rows(rows, attack)
                parts.append(attacked[successful_attack(model_label[clean], model_label[attacked], rows.labels[clean])])
        else:
            parts = [np.flatnonzero(rows.attack == name) for name in [CLEAN, *chosen]]
        order = np.concatenate(parts)
        attacked = np.repeat(np.arange(len(parts)) > 0, [len(p) for p in parts])
        labels = rows.labels[order] if keys.has_labels else None
        held = holdout_mask(rows.sample_id[order], self.calibration_fraction, seed=0)
        if held.all() or not (held & ~attacked).any():
            held[:] = False
        queries = noise_queries(path)
        self.n_classes_ = rows.num_classes
        self.n_queries_ = 0 if queries is None else int(queries[0])
        learn = ~held
        self.stream_fit_rows_ = (0, int(learn.sum()))
        self._fit_stream(stream, order[learn], attacked[learn], None if labels is None else labels[learn], max_rows)
        calibrate = order[(held if held.any() else np.ones(len(order), dtype=bool)) & ~attacked]
        (scores,) = stream.collect(calibrate, lambda z, q: (self._scores(*as_float64(z, q)),), noise=self.needs_noise)
        return self.calibrate(scores)

    def _fit_path_in_memory(self, path: TableSource, keys: Any, attacks: list[str] | None) -> Detector:
        """`fit_path` for detectors with an `input_column`: read only the rows and columns the fit uses."""
        from ...tables import read_table, table_columns

        present = table_columns(path)
        chosen = self._attacks_to_fit(keys.attacks, attacks, has_noise="noisy_logits" in present)
        if self.input_column not in present:
            raise LogitguardError(self._missing_column())
        # Unsupervised detectors learn from clean rows only: reading the attacked ones would be wasted.
        wanted = [CLEAN, *dict.fromkeys(chosen)] if self.successful_attacks_only else [CLEAN]
        columns = [self.input_column, *(["noisy_logits"] if self.needs_noise else [])]
        table = read_table(path, attacks=wanted, columns=columns)
        return self.fit_table(table, attacks=wanted[1:])

    def _fit_stream(self, stream: Any, rows: np.ndarray, attacked: np.ndarray, labels: np.ndarray | None,
                    max_rows: int | None) -> None:
        """`_fit` for `fit_path`: `rows` are the stream's row numbers to learn from, in `fit`'s order. By default
        the rows (or a sample of `max_rows`, see `fit_path`) are read into memory and given to `_fit`."""
        from .base import Detector

        if type(self)._fit is Detector._fit:
            return  # nothing to learn
        take = self._stream_sample(len(rows), max_rows, self._fit_row_bytes(stream.keys.num_classes))
        noise = self.needs_noise
        arrays = stream.collect(rows[take], lambda z, q: (z,) if q is None else (z, q), noise=noise)
        logits, noisy = as_float64(arrays[0], arrays[1] if noise else None)
        del arrays  # the float32 copies
        self._fit(logits, attacked[take], None if labels is None else labels[take], noisy)

    def _fit_row_bytes(self, num_classes: int) -> int:
        """Bytes per row of what `_fit` holds (for `stream_fit_bytes`): by default the float64 logits and K=4 queries."""
        return 8 * num_classes * (5 if self.needs_noise else 1)

    def _stream_sample(self, rows: int, max_rows: int | None, row_bytes: int) -> np.ndarray:
        """Positions of the rows a streamed fit keeps: all `rows`, or a seeded uniform sample in order."""
        cap = int(max_rows) if max_rows is not None else max(1000, self.stream_fit_bytes // max(row_bytes, 1))
        if cap < 1:
            raise LogitguardError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        kept = np.arange(rows) if rows <= cap else np.sort(
            np.random.default_rng(int(getattr(self, "seed", 0))).choice(rows, size=cap, replace=False))
        self.stream_fit_rows_ = (len(kept), rows)
        return kept


def as_float64(logits: np.ndarray, noisy: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """float64 copies, as `check_logits` makes for `fit` and `score_samples`."""
    return logits.astype(np.float64), None if noisy is None else noisy.astype(np.float64)
