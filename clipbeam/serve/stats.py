"""Queries served and their latency, for GET /stats.

Percentiles come from the most recent latencies of each query kind (a bounded
window, so a long-running server reports how it does now, in fixed memory).
"""

from __future__ import annotations

import collections
import threading

import numpy as np


class QueryStats:
    """Counts and recent latencies per query kind (text, image, vector, like)."""

    def __init__(self, window: int = 10_000) -> None:
        self._window = window
        self._lock = threading.Lock()
        self._latency: dict[str, collections.deque] = {}
        self._served: collections.Counter = collections.Counter()
        self._rejected: collections.Counter = collections.Counter()

    def record(self, kind: str, seconds: float) -> None:
        with self._lock:
            self._served[kind] += 1
            self._latency.setdefault(kind, collections.deque(maxlen=self._window)).append(seconds * 1000.0)

    def reject(self, status: int) -> None:
        with self._lock:
            self._rejected[str(status)] += 1

    def summary(self) -> dict:
        with self._lock:
            latency = {kind: list(values) for kind, values in self._latency.items()}
            served, rejected = dict(self._served), dict(self._rejected)
        every = [v for values in latency.values() for v in values]
        return {
            "queries_served": sum(served.values()),
            "by_kind": {kind: {"served": served[kind], **_percentiles(values)} for kind, values in latency.items()},
            "latency_ms": _percentiles(every),
            "rejected": rejected,
        }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3)}
