"""Running blocking work (model loads, inference, file I/O) off the event loop.

``iterate_in_thread`` is how a token stream crosses from an engine's worker thread to the event loop:
the generator is consumed entirely inside the worker; items are handed over one by one; when the
consumer goes away (client disconnect, handler cancelled) a flag is set that the worker checks
before pulling the next item, so generation stops within one token and the engine is freed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()


class _Abandoned(Exception):
    """The consumer left while the worker waited to hand over an item."""


async def run_blocking(executor: Executor | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(executor, functools.partial(ctx.run, fn, *args, **kwargs))


class CancelFlag:
    """Set by the event loop side when the consumer is gone; polled by the worker between items."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


async def iterate_in_thread(executor: Executor | None, make_iter: Callable[[CancelFlag], Iterator[T]],
                            *, maxsize: int = 0) -> AsyncIterator[T]:
    """Run ``make_iter(flag)`` in a worker thread and yield its items on the event loop.

    The worker stops at the next item once the returned async iterator is closed or cancelled;
    the worker is awaited before this generator finishes, so the engine is released when it returns.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
    flag = CancelFlag()

    def put(item: Any) -> None:
        if not maxsize:
            loop.call_soon_threadsafe(queue.put_nowait, item)
            return
        # Bounded: the worker waits for room (backpressure), but gives up once the consumer is gone.
        pending = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        while True:
            try:
                pending.result(timeout=0.05)
                return
            except concurrent.futures.TimeoutError:
                if flag.is_set():
                    pending.cancel()
                    raise _Abandoned from None

    def work() -> None:
        try:
            iterator = make_iter(flag)
            try:
                for item in iterator:
                    if flag.is_set():
                        break
                    put((True, item))
                    if flag.is_set():
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except _Abandoned:
            return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            with contextlib.suppress(_Abandoned):
                put((False, exc))
        else:
            with contextlib.suppress(_Abandoned):
                put((True, _DONE))

    ctx = contextvars.copy_context()
    future = loop.run_in_executor(executor, ctx.run, work)
    try:
        while True:
            ok, item = await queue.get()
            if not ok:
                raise item
            if item is _DONE:
                break
            yield item
    finally:
        flag.set()
        # Wait for the worker even when cancelled, so the caller only frees the engine once it is idle.
        await asyncio.shield(future)
