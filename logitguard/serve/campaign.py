"""Campaign watch: is one client sending a query attack's stream of near-identical logits?

Score- and decision-based black-box attacks (Square, RayS, HopSkipJump) query hundreds to thousands of
small perturbations of one image, so the logits of one client's consecutive queries nearly repeat; benign
traffic of different images lands far apart. Stateful detection (Chen, Carlini & Wagner 2019; Blacklight,
2022) watches inputs for this; a logits-only guard watches each client's logit stream instead.

Space: centred logits ``z - mean(z)`` under L2, the shortest L2 distance between two logit vectors over the
constant shift that softmax ignores (no exp, no saturation, any model's raw logits). Per new row, the mean
distance to its `neighbours` nearest among the client's previous `window` queries; a row is *near* under
`threshold`; a row raises an alarm when at least `min_queries` of the last `window` queries (itself
included) were near. `calibrate` sets `threshold` at a benign per-query near rate from benign logits.

Memory: at most `max_clients` clients (least recently seen dropped), each holding at most `window` rows of
C float32 logits plus a float64 time and three flags: O(max_clients × window × C) float32, about
``max_clients * window * (4 C + 11)`` bytes (`nbytes`). NumPy only; `observe` is vectorised over the rows
of a request and thread-safe.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import LogitguardError

__all__ = ["client_bytes", "DEFAULT_CAMPAIGN_FPR", "DEFAULT_CAMPAIGN_MAX_CLIENTS", "DEFAULT_CAMPAIGN_MIN_QUERIES",
           "DEFAULT_CAMPAIGN_NEIGHBOURS", "DEFAULT_CAMPAIGN_WINDOW", "CampaignWatch", "knn_distances"]

DEFAULT_CAMPAIGN_WINDOW = 1000
DEFAULT_CAMPAIGN_NEIGHBOURS = 4
DEFAULT_CAMPAIGN_MIN_QUERIES = 25
DEFAULT_CAMPAIGN_MAX_CLIENTS = 10000
DEFAULT_CAMPAIGN_FPR = 1e-3
# new rows compared with their history at once: memory O(_CHUNK × (window + _CHUNK)); small enough that
# OpenBLAS runs each product on one thread (larger ones went threaded and were 1000x slower on a busy host)
_CHUNK = 64


def client_bytes(num_classes: int, window: int = DEFAULT_CAMPAIGN_WINDOW) -> int:
    """The most one client's state holds: `window` rows of C float32 logits, a float64 time and three flags."""
    return window * (4 * num_classes + 11)


def centred(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits minus each row's mean, float32: the space distances are taken in."""
    z = np.asarray(logits, dtype=np.float64)
    return (z - np.einsum("ij->i", z)[:, None] / z.shape[1]).astype(np.float32)  # einsum: fast on small C


def knn_distances(history: np.ndarray, start: int, window: int, neighbours: int,
                  usable: np.ndarray | None = None) -> np.ndarray:
    """Mean L2 distance of rows ``history[start:]`` to their `neighbours` nearest among the `window` rows
    before each (rows where `usable` (M,) is false never count); inf with fewer candidates. history (M, C)
    float32 in distance space; returns (M - start,) float64."""
    m = len(history)
    out = np.empty(m - start, dtype=np.float64)
    ok = np.ones(m, bool) if usable is None else usable
    for a in range(start, m, _CHUNK):
        b = min(a + _CHUNK, m)
        lo = max(0, a - window)
        if b - 1 <= lo:
            out[a - start:b - start] = np.inf
            continue
        cand = history[lo:b - 1]
        # float32 products, taken from the chunk's first row: the norms stay small near the queries, so
        # the expansion below cancels little where distances are small
        ref = history[a]
        q, c = history[a:b] - ref, cand - ref
        d2 = (np.einsum("ij,ij->i", q, q)[:, None] + np.einsum("ij,ij->i", c, c)[None, :]
              - 2.0 * (q @ np.ascontiguousarray(c.T))).astype(np.float64)
        h = np.arange(a, b)[:, None]
        j = np.arange(lo, b - 1)[None, :]
        d2[(j >= h) | (j < h - window) | ~ok[lo:b - 1][None, :]] = np.inf
        k = min(neighbours, d2.shape[1])
        nearest = np.partition(d2, k - 1, axis=1)[:, :k] if k < d2.shape[1] else d2
        dist = np.sqrt(np.maximum(nearest, 0.0)).mean(axis=1) if k == neighbours else np.full(b - a, np.inf)
        out[a - start:b - start] = dist
    return out


@dataclass
class _Client:
    """One client's last W rows, oldest first, and counters: a sliding window rather than a ring, since each
    request copies at most W rows (cheaper than its distances) and the rows stay in time order."""

    logits: np.ndarray  # (<=W, C) float32, centred
    times: np.ndarray  # (<=W,) float64
    near: np.ndarray  # (<=W,) bool
    flagged: np.ndarray  # (<=W,) bool
    abstained: np.ndarray  # (<=W,) bool
    seen: int = 0
    near_total: int = 0
    alarms: int = 0
    in_alarm: bool = False
    first_seen: float = 0.0
    last_seen: float = 0.0
    window_near: int = 0


class CampaignWatch:
    """Per-client near-duplicate logit streams (see module).

    Parameters
    ----------
    threshold : distance under which a query is near a client's earlier ones (`calibrate` picks it).
    window : W, queries kept per client.  neighbours : k of the k-NN mean distance.
    min_queries : near queries within the window that raise an alarm.  max_clients : clients kept (LRU).
    horizon : seconds after which a query no longer counts (None: only the window bounds it).
    """

    def __init__(self, threshold: float, *, window: int = DEFAULT_CAMPAIGN_WINDOW,
                 neighbours: int = DEFAULT_CAMPAIGN_NEIGHBOURS, min_queries: int = DEFAULT_CAMPAIGN_MIN_QUERIES,
                 max_clients: int = DEFAULT_CAMPAIGN_MAX_CLIENTS, horizon: float | None = None) -> None:
        def integer(name: str, value: Any, low: int) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise LogitguardError(f"campaign watch: {name} must be an integer >= {low}, got {value!r}")
            return int(value)

        self.window = integer("window", window, 2)
        self.neighbours = integer("neighbours", neighbours, 1)
        self.min_queries = integer("min_queries", min_queries, 1)
        self.max_clients = integer("max_clients", max_clients, 1)
        if self.neighbours >= self.window or self.min_queries > self.window:
            raise LogitguardError(f"campaign watch: need neighbours < window and min_queries <= window, got "
                                  f"neighbours={neighbours}, min_queries={min_queries}, window={window}")
        if not (isinstance(threshold, (int, float, np.floating)) and np.isfinite(threshold) and threshold > 0):
            raise LogitguardError(f"campaign watch: threshold must be a finite number > 0, got {threshold!r}")
        if horizon is not None and not (isinstance(horizon, (int, float)) and np.isfinite(horizon) and horizon > 0):
            raise LogitguardError(f"campaign watch: horizon must be > 0 seconds or None, got {horizon!r}")
        self.threshold, self.horizon = float(threshold), None if horizon is None else float(horizon)
        self.num_classes: int | None = None
        self.calibration: dict[str, Any] | None = None
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._alarms_total = self._rows_alarmed = self._evicted = 0
        self._lock = threading.Lock()

    @classmethod
    def calibrate(cls, benign_logits: np.ndarray, *, fpr: float = DEFAULT_CAMPAIGN_FPR, by_class: bool = True,
                  seed: int = 0, **params: Any) -> CampaignWatch:
        """A watch whose `threshold` is the `fpr` quantile of k-NN distances on benign streams.

        benign_logits (M, C) are played as one stream in a seeded random order and, with `by_class`, as one
        stream per predicted class (a burst of one class: the hardest benign traffic); each row is measured
        against the `window` rows before it. A benign query is then near with probability about `fpr`, so a
        window holds about ``fpr * window`` near queries, which must stay well under `min_queries`.
        """
        probe = cls(1.0, **params)
        if not 0.0 < fpr < 1.0:
            raise LogitguardError(f"campaign watch: fpr must be in (0, 1), got {fpr!r}")
        if fpr * probe.window * 4 > probe.min_queries:
            raise LogitguardError(f"campaign watch: fpr × window = {fpr * probe.window:g} near queries per benign "
                                  f"window; min_queries={probe.min_queries} should be at least 4 times that")
        z = _checked(benign_logits)
        rng = np.random.default_rng(seed)
        streams = [rng.permutation(len(z))]
        if by_class:
            pred = z.argmax(axis=1)
            streams += [rng.permutation(np.flatnonzero(pred == c)) for c in np.unique(pred)]
        space = centred(z)
        d = np.concatenate([knn_distances(space[s], 0, probe.window, probe.neighbours) for s in streams])
        d = d[np.isfinite(d)]
        if len(d) < 1.0 / fpr:
            raise LogitguardError(f"campaign watch: {len(d)} benign distances cannot resolve fpr={fpr:g}; "
                                  f"give at least {int(np.ceil(1 / fpr))} rows or a larger fpr")
        watch = cls(float(np.quantile(d, fpr)), **params)
        watch.calibration = {"fpr": float(fpr), "rows": len(z), "distances": len(d), "by_class": by_class,
                             "median_distance": float(np.median(d))}
        return watch

    def observe(self, client: str, logits: np.ndarray, flagged: np.ndarray | None = None,
                abstained: np.ndarray | None = None, now: float | None = None) -> np.ndarray:
        """Add one request's N rows from `client`; (N,) bool: the client is in alarm after each row.

        logits (N, C); flagged, abstained (N,) bool (the guard's decisions; counted, not used for alarms);
        now: the request's time in seconds (default ``time.monotonic()``).
        """
        if not isinstance(client, str) or not client:
            raise LogitguardError("campaign watch: client must be a non-empty string (a token hash or address)")
        z = _checked(logits)
        n = len(z)
        flags = [np.zeros(n, bool) if v is None else np.asarray(v, dtype=bool) for v in (flagged, abstained)]
        if any(f.shape != (n,) for f in flags):
            raise LogitguardError(f"campaign watch: flagged and abstained must have shape ({n},)")
        now = time.monotonic() if now is None else float(now)
        with self._lock:
            if self.num_classes is None:
                self.num_classes = z.shape[1]
            elif z.shape[1] != self.num_classes:
                raise LogitguardError(f"campaign watch: {z.shape[1]} classes, the watch has {self.num_classes}")
            state = self._client(client, now)
            b = len(state.times)
            live = np.ones(b + n, bool)
            if self.horizon is not None:
                live[:b] = state.times >= now - self.horizon
            history = np.concatenate([state.logits, centred(z)])
            near_new = knn_distances(history, b, self.window, self.neighbours, live) < self.threshold
            near = np.concatenate([state.near & live[:b], near_new])
            counts = np.concatenate([[0], np.cumsum(near)])
            h = np.arange(b, b + n) + 1
            alarms = counts[h] - counts[np.maximum(h - self.window, 0)] >= self.min_queries
            before = np.concatenate([[state.in_alarm], alarms[:-1]])
            self._alarms_total += int((alarms & ~before).sum())
            self._rows_alarmed += int(alarms.sum())
            state.alarms += int((alarms & ~before).sum())
            keep = slice(-self.window, None)
            state.logits = history[keep]
            state.times = np.concatenate([state.times, np.full(n, now)])[keep]
            state.near = np.concatenate([state.near, near_new])[keep]
            state.flagged = np.concatenate([state.flagged, flags[0]])[keep]
            state.abstained = np.concatenate([state.abstained, flags[1]])[keep]
            state.seen += n
            state.near_total += int(near_new.sum())
            state.in_alarm, state.last_seen = bool(alarms[-1]), now
            state.window_near = int(near[-self.window:].sum())
        return alarms

    def _client(self, client: str, now: float) -> _Client:
        state = self._clients.get(client)
        if state is None:
            c = self.num_classes or 0
            state = _Client(np.zeros((0, c), np.float32), np.zeros(0), *(np.zeros(0, bool) for _ in range(3)),
                            first_seen=now, last_seen=now)
            self._clients[client] = state
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
                self._evicted += 1
        self._clients.move_to_end(client)
        return state

    def _in_alarm(self, state: _Client, now: float | None) -> bool:
        return state.in_alarm and (self.horizon is None or now is None or state.last_seen >= now - self.horizon)

    def metrics(self, now: float | None = None) -> dict[str, int]:
        """Prometheus figures: ``alarms_total`` (alarm onsets), ``rows_alarmed_total``, ``clients_in_alarm``,
        ``clients_tracked``, ``clients_evicted_total``."""
        with self._lock:
            return {"alarms_total": self._alarms_total, "rows_alarmed_total": self._rows_alarmed,
                    "clients_in_alarm": sum(self._in_alarm(s, now) for s in self._clients.values()),
                    "clients_tracked": len(self._clients), "clients_evicted_total": self._evicted}

    def nbytes(self) -> int:
        """Bytes held by every client's arrays."""
        with self._lock:
            return sum(a.nbytes for s in self._clients.values()
                       for a in (s.logits, s.times, s.near, s.flagged, s.abstained))

    def status(self, client: str | None = None, now: float | None = None, limit: int = 20) -> dict[str, Any]:
        """JSON-ready state for ``/v1/info``: settings, `metrics`, and per-client summaries (``client`` is a
        short sha256 of the id, never the id) for `client`, or else for up to `limit` clients in alarm."""
        with self._lock:
            if client is not None:
                chosen = [(client, self._clients[client])] if client in self._clients else []
            else:
                chosen = [(c, s) for c, s in reversed(self._clients.items()) if self._in_alarm(s, now)][:limit]
            summaries = [self._summary(c, s, now) for c, s in chosen]
        return {"window": self.window, "neighbours": self.neighbours, "threshold": self.threshold,
                "min_queries": self.min_queries, "max_clients": self.max_clients, "horizon": self.horizon,
                "space": "centred logits, L2", "calibration": self.calibration, **self.metrics(now),
                "clients": summaries}

    def _summary(self, client: str, s: _Client, now: float | None) -> dict[str, Any]:
        held = len(s.times)
        span = float(s.times[-1] - s.times[0]) if held > 1 else 0.0
        return {"client": hashlib.sha256(client.encode()).hexdigest()[:12], "queries": s.seen, "window_rows": held,
                "window_near": s.window_near, "near_total": s.near_total, "alarms": s.alarms,
                "in_alarm": self._in_alarm(s, now), "rate_per_s": (held - 1) / span if span > 0 else None,
                "flagged_rate": float(s.flagged.mean()) if held else None,
                "abstained_rate": float(s.abstained.mean()) if held else None}


def _checked(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits)
    if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 2 or not np.issubdtype(z.dtype, np.number):
        raise LogitguardError(f"campaign watch: logits must be a numeric (N, C) array with N >= 1, C >= 2, "
                              f"got shape {z.shape}")
    if not np.isfinite(z).all():
        raise LogitguardError("campaign watch: logits must be finite")
    return z
