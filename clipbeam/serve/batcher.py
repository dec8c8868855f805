"""Concurrent queries -> one batch on one worker thread.

On two cores, encoding 16 texts in one model call costs little more than
encoding one, and torch or faiss calls from several threads only fight over
the same cores. So requests wait on a future while the single worker runs
whatever has queued up since its last batch: no added latency when the server
is idle, bigger batches (and more queries/s) under load.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Generic, TypeVar

Item = TypeVar("Item")


class Batcher(Generic[Item]):
    """`await submit(item)` -> that item's entry of `work(batch)`, run on one thread, `max_batch` at a time."""

    def __init__(self, work: Callable[[list[Item]], list[Any]], max_batch: int = 64,
                 initializer: Callable[[], None] | None = None) -> None:
        self._work = work
        self._max_batch = max_batch
        self._pending: list[tuple[Item, asyncio.Future]] = []
        self._draining = False
        # OpenMP thread counts are per thread: the worker sets its own (see SearchEngine.prepare_thread).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipbeam-serve",
                                            initializer=initializer)

    @property
    def waiting(self) -> int:
        """Items submitted and not yet handed to the worker."""
        return len(self._pending)

    async def submit(self, item: Item) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
                try:
                    results = await loop.run_in_executor(self._executor, self._work, [item for item, _ in batch])
                except Exception as exc:  # the worker failed as a whole: every waiting request hears why
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._draining = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
