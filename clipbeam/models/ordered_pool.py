"""A bounded pool of threads whose results come back in submission order (no Beam).

Decoding and resizing images releases the GIL (PIL and torch do their work in
C), so a few threads inside one worker process keep the model fed. Results are
handed back in the order the items went in, and no more than `window` items
are in flight, so memory stays bounded however long the input is.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator


class OrderedPool:
    """Apply `fn` on `threads` threads; `submit` returns the results that are ready, oldest first.

    With one thread, `fn` runs inline (no thread hand-off at all).
    """

    def __init__(self, fn: Callable[[Any], Any], threads: int, window: int) -> None:
        self._fn = fn
        self._window = max(window, threads, 1)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="clipbeam-decode") if threads > 1 else None
        self._pending: deque[tuple[Any, Future | Any]] = deque()

    def submit(self, item: Any, tag: Any = None) -> list[tuple[Any, Any]]:
        """Queue `item`; returns (tag, result) for every finished item at the head of the queue,
        waiting for the oldest ones while more than `window` are in flight."""
        if self._executor is None:
            return [(tag, self._fn(item))]
        self._pending.append((tag, self._executor.submit(self._fn, item)))
        ready = []
        while self._pending and (len(self._pending) > self._window or self._pending[0][1].done()):
            head_tag, future = self._pending.popleft()
            ready.append((head_tag, future.result()))
        return ready

    def drain(self) -> list[tuple[Any, Any]]:
        """Wait for everything still in flight; results in submission order."""
        ready = [(tag, future.result()) for tag, future in self._pending]
        self._pending.clear()
        return ready

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], threads: int, window: int) -> Iterator[Any]:
    """`map(fn, items)` on a bounded thread pool, results in order (for loops outside Beam)."""
    pool = OrderedPool(fn, threads, window)
    try:
        for item in items:
            for _, result in pool.submit(item):
                yield result
        for _, result in pool.drain():
            yield result
    finally:
        pool.close()
