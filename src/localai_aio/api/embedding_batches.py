"""Dynamic batching: concurrent requests for one model are merged into one engine run.

A request hands in its items and waits; the first item of a batch opens a short collection window
(``window`` seconds); the batch closes when the window ends or ``max_size`` items have arrived, runs
once, and each request gets its own slice of the results back, in order. A request larger than
``max_size`` is run on its own. An error in a run is raised in every request of that batch.
Up to ``concurrency`` batches run at once (a model's instances); items waiting beyond ``max_pending``
are refused with 503, so a burst cannot queue without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from localai_aio.errors import ServerBusy

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T]):
    items: Sequence[T]
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher(Generic[T, R]):
    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]], *, window: float, max_size: int,
                 concurrency: int = 1, max_pending: int | None = None):
        self._run = run
        self.window = window
        self.max_size = max(1, max_size)
        self.max_pending = max_pending
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._running: set[asyncio.Task] = set()
        self._queue: list[_Pending[T]] = []
        self._size = 0
        self._full = asyncio.Event()
        self._collector: asyncio.Task | None = None
        self.runs = 0  # batches run so far (for tests and metrics)

    async def submit(self, items: Sequence[T]) -> list[R]:
        if len(items) >= self.max_size:
            async with self._slots:
                self.runs += 1
                return list(await self._run(list(items)))
        if self.max_pending is not None and self._size + len(items) > self.max_pending:
            raise ServerBusy(f"{self._size} embedding inputs are already waiting; retry later", retry_after=1)
        pending = _Pending(items)
        self._queue.append(pending)
        self._size += len(items)
        if self._size >= self.max_size:
            self._full.set()
        if self._collector is None or self._collector.done():
            self._collector = asyncio.create_task(self._collect())
        return await asyncio.shield(pending.future)

    async def _collect(self) -> None:
        while self._queue:
            try:
                await asyncio.wait_for(self._full.wait(), self.window)
            except TimeoutError:
                pass
            await self._slots.acquire()  # at most `concurrency` batches run; the rest keep waiting (and counting)
            batch, taken = [], 0
            while self._queue and (not batch or taken + len(self._queue[0].items) <= self.max_size):
                pending = self._queue.pop(0)
                batch.append(pending)
                taken += len(pending.items)
            self._size -= taken
            if self._size < self.max_size:
                self._full.clear()
            task = asyncio.create_task(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _run_batch(self, batch: list[_Pending[T]]) -> None:
        merged: list[Any] = [item for pending in batch for item in pending.items]
        self.runs += 1
        try:
            results = list(await self._run(merged))
        except BaseException as exc:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        offset = 0
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result(results[offset: offset + len(pending.items)])
            offset += len(pending.items)
