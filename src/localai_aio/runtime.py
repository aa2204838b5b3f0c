"""Running blocking work (model loads, inference, file I/O) off the event loop.

``EngineThread`` is the one thread that owns one engine instance: llama.cpp parallelises with OpenMP,
whose thread team belongs to the calling thread, so a model called from whichever pool worker is free
builds a team per worker and the teams fight over the cores (half speed after a few requests). Every
call into an engine (load, tokenize, generate, embed, close) therefore runs on its own thread, in
order; an engine with a scheduling loop of its own (``busy``/``step``) has its steps run there too,
with the queued calls taken between steps.

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
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from localai_aio import cpu_budget

T = TypeVar("T")

log = logging.getLogger(__name__)

_DONE = object()
_STOP = object()
#: Calls taken between two steps of a busy engine, so that a burst of calls cannot stall its streams.
_CALLS_PER_STEP = 8


class Stepper(Protocol):
    """An engine that runs its own loop: ``step`` is called on its thread for as long as ``busy``."""

    def busy(self) -> bool: ...

    def step(self) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class EngineThread(Executor):
    """A single-thread executor dedicated to one engine instance for its whole life."""

    def __init__(self, name: str, account: cpu_budget.Account | None = None):
        self._account = account
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stepper: Stepper | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def attach(self, stepper: Stepper) -> None:
        """Called on this thread by an engine whose steps this thread should run."""
        self._stepper = stepper

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        if self._closed:
            raise RuntimeError("the engine thread has been shut down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._calls.put(_STOP)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        cpu_budget.bind(self._account)  # before the engine loads: the native pools it starts inherit the priority
        while True:
            stepper = self._stepper
            busy = stepper is not None and stepper.busy()
            for _ in range(_CALLS_PER_STEP if busy else 1):
                try:
                    item = self._calls.get(block=not busy)
                except queue.Empty:
                    break
                if item is _STOP:
                    return
                future, fn, args, kwargs = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:
                        future.set_exception(exc)
            if busy and stepper is not None:
                try:
                    stepper.step()
                except BaseException as exc:  # a bug in a step must not kill the thread: its requests fail
                    log.exception("an engine step failed")
                    stepper.fail(exc)


#: The niceness of threads that prepare work for the engines (see ``lower_priority``).
WORKER_NICENESS = 10


def lower_priority() -> None:
    """Make the calling thread yield the CPU to the engines' threads (Linux: per-thread niceness).

    llama.cpp decodes with a team of threads that meet at a barrier after every layer: when a thread
    that parses a 20,000-message request takes one of their cores, the whole team waits for it, and a
    stream beside that request stalls for a hundred milliseconds at a time. At niceness 10 the kernel
    gives such a thread the cores the engines leave over.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


async def run_blocking(executor: Executor | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(executor, functools.partial(ctx.run, fn, *args, **kwargs))


async def run_sized(large: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the default worker pool when the input is ``large``, else right here: a big request's
    parsing or shaping would hold the event loop, which writes every stream's tokens, while for a small one
    the hop to a thread costs more than the work."""
    return await run_blocking(None, fn, *args) if large else fn(*args)


class CancelFlag:
    """Set by the event loop side when the consumer is gone; polled by the worker between items."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


async def iterate_in_thread(executor: Executor | None, make_iter: Callable[[CancelFlag], Iterator[T]]
                            ) -> AsyncIterator[T]:
    """Run ``make_iter(flag)`` in a worker thread and yield its items on the event loop.

    The worker never waits for the consumer (its items wait in a queue here). It stops at the next item
    once the returned async iterator is closed or cancelled; the worker is awaited before this
    generator finishes, so the engine is released when it returns.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    flag = CancelFlag()

    def put(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

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
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put((False, exc))
        else:
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


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


async def produced(produce: Callable[[Callable[[Any], None]], Awaitable[None]]) -> AsyncIterator[Any]:
    """Run ``produce(put)`` in a task of its own and yield what it puts, at the consumer's pace.

    Why: a response written at the client's pace must not hold what the producer holds (a model).
    The producer never waits for the consumer; what it puts waits here (callers bound it: a token
    budget, a text's audio). Its exception is raised to the consumer in order; when the consumer
    leaves (close this with ``contextlib.aclosing``), the producer is cancelled and awaited.
    """
    out: asyncio.Queue[Any] = asyncio.Queue()

    async def run() -> None:
        try:
            await produce(out.put_nowait)
        except BaseException as exc:
            out.put_nowait(_Failed(exc))
            raise
        out.put_nowait(_DONE)

    task = asyncio.ensure_future(run())
    try:
        while True:
            item = await out.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
