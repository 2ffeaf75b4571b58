"""Dynamic batching: the rows of concurrent requests decided by one call of the guard.

One row reads every weight of a corrector or detector (80 MB at C=1000, D=10,000), so deciding single-row
requests one at a time is memory-bound; model servers batch concurrent requests for that reason (Triton's
dynamic batcher). `MicroBatcher` does it for the threads that serve requests:

- a request arriving while no batch is being decided becomes the *leader*: it waits `max_delay` seconds
  (default 0) for company, then decides every pending request's rows in one call (at most `max_rows`);
- requests arriving while a batch is decided wait; when it ends, the leader hands the lead to the oldest
  waiting request, which decides everything that piled up meanwhile, and returns its own answer.

So one request alone pays no delay, and under load each batch holds what arrived during the previous one.
A batch that fails (one request's rows the guard refuses) is decided again request by request, so only that
request gets the error. Decisions are row-wise: a row's answer does not depend on its batch-mates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..defenses.decision import Decision

__all__ = ["MicroBatcher"]

Decide = Callable[[np.ndarray, "np.ndarray | None"], Decision]


@dataclass(eq=False)
class _Request:
    logits: np.ndarray
    noisy: np.ndarray | None
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    result: Decision | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Calls ``decide(logits (N, C), noisy (N, K, C) or None) -> Decision`` on the rows of concurrent calls
    at once (see module). Thread-safe; ``batcher(logits, noisy)`` returns this call's own `Decision`.

    max_rows : rows per batch at most (a larger request is decided alone).  max_delay : seconds a leader
    waits for company before deciding (0: none).  ``batches`` and ``rows`` count what was decided.
    """

    def __init__(self, decide: Decide, *, max_rows: int = 4096, max_delay: float = 0.0) -> None:
        self.decide, self.max_rows, self.max_delay = decide, max_rows, max_delay
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._busy = False
        self.batches = self.rows = 0

    def __call__(self, logits: np.ndarray, noisy: np.ndarray | None = None) -> Decision:
        request = _Request(logits, noisy)
        with self._lock:
            self._pending.append(request)
            request.lead = not self._busy
            self._busy = True
        while True:
            if request.lead:
                self._lead(request)
            else:
                request.wake.wait()
            if request.result is not None or request.error is not None:
                break
        if request.error is not None:
            raise request.error
        return request.result

    def _lead(self, request: _Request) -> None:
        """Decide batches until `request` is answered, then hand the lead on (or end it)."""
        request.lead = False
        if self.max_delay:
            time.sleep(self.max_delay)
        while request.result is None and request.error is None:
            with self._lock:
                batch, size = [], 0
                while self._pending and (not batch or size + len(self._pending[0].logits) <= self.max_rows):
                    size += len(self._pending[0].logits)
                    batch.append(self._pending.pop(0))
            self._run(batch)
        with self._lock:
            if self._pending:
                self._pending[0].lead = True
                self._pending[0].wake.set()
            else:
                self._busy = False

    def _run(self, batch: list[_Request]) -> None:
        """Decide `batch` in one call and give each request its rows (alone, where the batch fails)."""
        try:
            if len(batch) == 1:
                decisions = [self.decide(batch[0].logits, batch[0].noisy)]
            else:
                noisy = None if batch[0].noisy is None else np.concatenate([r.noisy for r in batch])
                whole = self.decide(np.concatenate([r.logits for r in batch]), noisy)
                ends = np.cumsum([len(r.logits) for r in batch])[:-1]
                parts = [np.split(np.asarray(column), ends) for column in whole]
                decisions = [Decision(*columns) for columns in zip(*parts)]
        except Exception as exc:  # noqa: BLE001 - told to its own request below
            if len(batch) == 1:
                batch[0].error = exc
            else:
                for request in batch:
                    self._run([request])
            decisions = []
        for request, decision in zip(batch, decisions):
            request.result = decision
        if decisions:
            with self._lock:
                self.batches += 1
                self.rows += sum(len(r.logits) for r in batch)
        for request in batch:
            request.wake.set()
