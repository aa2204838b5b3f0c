"""The model registry: name -> config -> loaded engine instances, shared by every API family.

Why it is shaped this way:
- Loads are lazy and happen at most once however many requests arrive together (one shared load
  task per model; the first requester leaving does not cancel it).
- Every engine instance gets its own thread for its whole life (``EngineThread``): its load, every
  call and its close run there, because llama.cpp's OpenMP teams belong to the calling thread and
  GGUF engines crash when one instance is used from two threads. ``acquire`` hands out an
  ``EngineHandle``: the instance plus the way to run calls on its thread.
- A batching backend (llama-cpp) is loaded once and its handle is shared by up to ``parallel``
  requests, which its own loop runs together. Other backends get ``parallel`` instances, one request
  each. Either way requests beyond ``parallel`` wait in a bounded queue, then get 503 with
  ``Retry-After``.
- Free instances wait in an ``asyncio.Queue``: a waiter cancelled just as it is woken passes the
  wake-up on (``asyncio.Condition`` loses it on Python 3.11 and 3.12, leaving a waiter beside a free
  instance).
- ``max_loaded_models`` unloads the least recently used idle model; ``idle_timeout`` unloads idle ones.
  Preloaded models are pinned: neither unloads them, so readiness stays true; a failed preload is
  remembered with its reason for ``/readyz``.
- ``reload`` takes new configs while serving: requests already inside ``acquire`` keep the model's state
  (and engine) they hold, new ones get the new config; a changed or removed model's old state is unloaded
  once its last request is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from localai_aio.backends import CONCURRENT_BACKENDS, default_priority
from localai_aio.backends.base import Backend, BackendError, infer_backend
from localai_aio.config import ModelConfig, ServerSettings
from localai_aio.cpu_budget import CpuBudget, Priority, usable_cores
from localai_aio.errors import ModelLoadFailed, ModelNotFound, ServerBusy
from localai_aio.metrics import Metrics
from localai_aio.runtime import CancelFlag, EngineThread, iterate_in_thread, run_blocking

log = logging.getLogger(__name__)


def usecases(cfg: ModelConfig) -> set[str]:
    """What a model serves: its YAML's ``known_usecases``, else what its backend can do."""
    if cfg.known_usecases:
        return {u.lower() for u in cfg.known_usecases}
    backend = cfg.backend or infer_backend(cfg)
    if backend in {"llama-cpp", "ctransformers"}:
        if backend == "llama-cpp" and str(cfg.option("pooling", "")).lower() == "rank":
            return {"rerank"}  # a cross-encoder GGUF: its head scores pairs, it does not generate
        return {"chat", "completion"} | ({"embeddings"} if cfg.embeddings else set())
    return {
        "onnx-embeddings": {"embeddings"}, "onnx-rerank": {"rerank"}, "onnx-whisper": {"transcript"},
        "piper": {"tts"}, "onnx-diffusion": {"image"},
    }.get(backend or "", set())


@dataclass(frozen=True)
class EngineHandle:
    """A loaded engine instance and the thread that owns it: every call into it goes through here."""

    engine: Any
    thread: EngineThread

    async def run(self, fn: Callable[..., Any], *args: Any, cancel: CancelFlag | None = None, **kwargs: Any) -> Any:
        """Run ``fn`` (a method of the engine, or a function that uses it) on the engine's thread.

        If the caller is cancelled (its client left), ``cancel`` (passed on to ``fn``) tells the work to
        stop, and the work is awaited all the same: the instance goes back to the pool only once its
        thread is done with it, so the next request never finds it busy.
        """
        return await self._awaited(self.thread, fn, *args, cancel=cancel, **kwargs)

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn``, which only reads the engine's vocabulary (tokenizing a prompt, checking a grammar).

        An engine whose vocabulary is read-only (``reads_anywhere``: llama.cpp's is; its own server tokenizes
        on its HTTP threads while the main loop decodes) has it done on a worker thread, so its decode loop
        never waits for a long prompt's tokenization; other engines only on their own thread. Either way it
        is awaited to its end, also when the caller is cancelled: the engine is never closed under a reader.
        """
        executor = None if getattr(self.engine, "reads_anywhere", False) else self.thread
        return await self._awaited(executor, fn, *args)

    async def _awaited(self, executor: EngineThread | None, fn: Callable[..., Any], *args: Any,
                       cancel: CancelFlag | None = None, **kwargs: Any) -> Any:
        if cancel is not None:
            kwargs["cancel"] = cancel
        future = asyncio.ensure_future(run_blocking(executor, fn, *args, **kwargs))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if cancel is not None:
                cancel.set()
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # the work's own end (often "cancelled") is not this caller's news
            raise

    def iterate(self, make_iter: Callable[[CancelFlag], Iterator[Any]]) -> AsyncIterator[Any]:
        """A blocking generator consumed on the engine's thread, its items handed to the event loop."""
        return iterate_in_thread(self.thread, make_iter)

    async def close(self) -> None:
        close = getattr(self.engine, "close", None)
        try:
            if close is not None:
                await self.run(close)
        finally:
            self.thread.shutdown(wait=False)


@dataclass
class _ModelState:
    """Runtime state of one configured model: its config, loaded instances, users and load errors."""

    cfg: ModelConfig
    parallel: int = 1  # requests served at once
    shared: bool = False  # one batching instance serves them all
    pinned: bool = False  # preloaded: never unloaded for idleness or room
    instances: list[EngineHandle] = field(default_factory=list)
    free: asyncio.Queue[EngineHandle | None] = field(default_factory=asyncio.Queue)  # None: unloaded
    users: int = 0  # requests inside acquire(): waiting, loading or running
    last_used: float = 0.0
    loading: asyncio.Future[None] | None = None
    load_error: str | None = None  # why the last load failed, until one succeeds
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever its last request leaves

    @property
    def loaded(self) -> bool:
        return bool(self.instances)


@dataclass(frozen=True)
class Reloaded:
    """What a reload changed, by model name."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


class ModelRegistry:
    def __init__(self, configs: Mapping[str, ModelConfig], settings: ServerSettings, *,
                 backends: Mapping[str, Backend], metrics: Metrics | None = None, budget: CpuBudget | None = None):
        self.settings = settings
        #: The cores every engine of this registry draws its threads from (cpu_budget).
        self.budget = budget or CpuBudget(usable_cores(), settings.cpu_policy, bulk_share=settings.cpu_bulk_share)
        self._backends = dict(backends)
        self._metrics = metrics
        self._models: dict[str, _ModelState] = {name: self._new_state(cfg) for name, cfg in configs.items()}
        self._aliases: dict[str, str] = {}
        self._index()
        self._evict_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    def _new_state(self, cfg: ModelConfig) -> _ModelState:
        shared = self.backend_name(cfg) in CONCURRENT_BACKENDS
        return _ModelState(cfg, cfg.parallel or (self.settings.parallel if shared else 1), shared)

    def _index(self) -> None:
        """Aliases and preload pins, from the model states."""
        self._aliases = {}
        for name, state in self._models.items():
            for alias in state.cfg.aliases:
                if alias not in self._models:
                    self._aliases.setdefault(alias, name)
        for name in self.settings.preload_models:  # create_app refuses unknown names at start
            state = self._models.get(name) or self._models.get(self._aliases.get(name, ""))
            if state is not None:
                state.pinned = True

    def reload(self, configs: Mapping[str, ModelConfig]) -> Reloaded:
        """Serve ``configs`` from now on. Unchanged models keep their loaded engines; a changed or removed
        model's old state serves the requests that hold it and is unloaded once they are done."""
        added = [name for name in configs if name not in self._models]
        changed = [name for name in configs if name in self._models and self._models[name].cfg != configs[name]]
        removed = [name for name in self._models if name not in configs]
        for name in changed + removed:
            self._retire(self._models.pop(name))
        for name in added + changed:
            self._models[name] = self._new_state(configs[name])
        self._index()
        return Reloaded(tuple(added), tuple(changed), tuple(removed))

    def _retire(self, state: _ModelState) -> None:
        async def when_idle() -> None:
            if state.loading is not None:
                await asyncio.wait([state.loading])
            while state.users:
                state.idle.clear()
                await state.idle.wait()
            await self._unload(state, reason="its config changed or was removed")

        task = asyncio.ensure_future(when_idle())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- lookup -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._models)

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def config(self, name: str) -> ModelConfig:
        state = self._models.get(name) or self._models.get(self._aliases.get(name, ""))
        if state is None:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return state.cfg

    def backend_name(self, cfg: ModelConfig) -> str | None:
        return cfg.backend or infer_backend(cfg)

    def priority(self, cfg: ModelConfig) -> Priority:
        """The model's turn on the cores: its YAML's ``priority``, else its backend's default."""
        return cfg.priority or default_priority(self.backend_name(cfg))

    def first_model(self, usecase: str) -> ModelConfig:
        """The first configured model able to serve ``usecase`` (LocalAI's rule for a missing ``model``)."""
        for state in self._models.values():
            if usecase in self.usecases(state.cfg):
                return state.cfg
        raise ModelNotFound(f"No model is configured for {usecase}; pass `model`", param="model")

    def usecases(self, cfg: ModelConfig) -> set[str]:
        return usecases(cfg)

    def is_loaded(self, name: str) -> bool:
        return self._models[self.config(name).name].loaded

    def parallel(self, name: str) -> int:
        """Requests the model serves at once (its instances, or a batching engine's slots)."""
        return self._models[self.config(name).name].parallel

    def load_error(self, name: str) -> str | None:
        """Why the model's last load failed, until a load succeeds."""
        return self._models[self.config(name).name].load_error

    def loaded_names(self) -> list[str]:
        return [name for name, state in self._models.items() if state.loaded]

    def load_reports(self) -> dict[str, dict[str, float]]:
        """Per loaded model: requests running and waiting, and a batching engine's token counters."""
        reports = {}
        for name, state in self._models.items():
            if not state.loaded:
                continue
            if state.shared:
                reports[name] = dict(state.instances[0].engine.load_report())
            else:
                busy = len(state.instances) - state.free.qsize()
                reports[name] = {"busy": busy, "queued": max(0, state.users - busy)}
        for name, report in self.budget.report().items():
            if name in reports:
                reports[name].update(report)
        return reports

    # -- use ----------------------------------------------------------------------------------------------

    async def call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(engine, *args)`` on an instance of ``name``, on that instance's thread, holding it only
        for the call: for work that is one call (a batch of embeddings, a tokenization)."""
        async with self.acquire(name) as handle:
            return await handle.run(fn, handle.engine, *args)

    async def read(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(engine, *args)`` where it only reads the vocabulary (see ``EngineHandle.read``)."""
        async with self.acquire(name) as handle:
            return await handle.read(fn, handle.engine, *args)

    @contextlib.asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[EngineHandle]:
        """Hold an engine instance of ``name`` for the duration of the block (shared, for a batching one)."""
        state = self._models[self.config(name).name]
        capacity = state.parallel + self.settings.queue_size
        if state.users >= capacity:
            raise ServerBusy(f"Model '{state.cfg.name}' is busy: {state.users} requests are already "
                             "running or waiting; retry later", retry_after=1)
        state.users += 1
        engine = None
        try:
            await self._ensure_loaded(state)
            if state.shared:
                if not state.instances:
                    raise ModelLoadFailed(f"Model '{state.cfg.name}' was unloaded", param="model")
                yield state.instances[0]
                return
            free = state.free
            engine = await free.get()
            if engine is None:  # unloaded while we waited (only on shutdown): tell the next waiter too
                free.put_nowait(None)
                raise ModelLoadFailed(f"Model '{state.cfg.name}' was unloaded", param="model")
            yield engine
        finally:
            state.users -= 1
            state.last_used = time.monotonic()
            if not state.users:
                state.idle.set()
            if engine is not None and engine in state.instances:
                state.free.put_nowait(engine)

    async def load(self, name: str) -> None:
        await self._ensure_loaded(self._models[self.config(name).name])

    async def _ensure_loaded(self, state: _ModelState) -> None:
        if state.loaded:
            return
        if state.loading is None:
            state.loading = asyncio.ensure_future(self._load(state))
        task = state.loading
        try:
            await asyncio.shield(task)
        except ModelLoadFailed as exc:
            state.load_error = exc.message
            raise
        finally:
            if task.done() and state.loading is task:
                state.loading = None  # success or failure: a failed load is retried by the next request

    async def _load(self, state: _ModelState) -> None:
        cfg = state.cfg
        backend_name = self.backend_name(cfg)
        if cfg.error:
            raise ModelLoadFailed(f"Model '{cfg.name}' cannot be loaded: {cfg.error}", param="model")
        backend = self._backends.get(backend_name or "")
        if backend is None:
            known = ", ".join(sorted(self._backends)) or "none"
            what = f"backend '{backend_name}' is not available" if backend_name else "no backend is configured " \
                "and none can be inferred from its file"
            raise ModelLoadFailed(f"Model '{cfg.name}' cannot be loaded: {what} (available: {known})",
                                  param="model")
        await self._make_room(state)
        started = time.monotonic()
        count = 1 if state.shared else state.parallel
        log.info("loading model %s (backend %s, %d instance(s), %d request(s) at once)", cfg.name, backend_name,
                 count, state.parallel)
        instances: list[EngineHandle] = []
        try:
            for i in range(count):
                instances.append(await self._load_instance(backend, cfg, f"engine-{cfg.name}-{i}"[:60]))
        except BackendError as exc:
            await self._close_all(instances)
            log.error("loading model %s failed: %s", cfg.name, exc)
            raise ModelLoadFailed(f"Model '{cfg.name}' cannot be loaded: {exc}", param="model") from None
        except Exception as exc:
            await self._close_all(instances)
            log.exception("loading model %s failed", cfg.name)
            raise ModelLoadFailed(f"Model '{cfg.name}' cannot be loaded: {type(exc).__name__}",
                                  param="model") from None
        elapsed = time.monotonic() - started
        state.instances = instances
        state.free = asyncio.Queue()
        for handle in instances:
            state.free.put_nowait(handle)
        state.last_used = time.monotonic()
        state.load_error = None
        log.info("loaded model %s in %.2f s", cfg.name, elapsed)
        if self._metrics:
            self._metrics.model_loads.labels(cfg.name).observe(elapsed)
            self._metrics.loaded_models.set(len(self.loaded_names()))

    async def _load_instance(self, backend: Backend, cfg: ModelConfig, thread_name: str) -> EngineHandle:
        thread = EngineThread(thread_name, self.budget.account(cfg.name, self.priority(cfg)))

        def load() -> Any:
            engine = backend(cfg, self.settings)
            if hasattr(engine, "step"):
                thread.attach(engine)  # the thread now runs the engine's own loop between calls
            return engine

        try:
            return EngineHandle(await run_blocking(thread, load), thread)
        except BaseException:
            thread.shutdown(wait=False)
            raise

    async def _make_room(self, state: _ModelState) -> None:
        limit = self.settings.max_loaded_models
        if not limit:
            return
        async with self._evict_lock:
            others = [s for s in self._models.values() if s is not state and (s.loaded or s.loading)]
            while len(others) >= limit:
                idle = [s for s in others if s.loaded and s.users == 0 and not s.pinned]
                if not idle:
                    raise ServerBusy(f"{limit} model(s) are loaded and all are in use or preloaded; "
                                     f"cannot load '{state.cfg.name}' now", retry_after=2)
                victim = min(idle, key=lambda s: s.last_used)
                await self._unload(victim, reason="least recently used")
                others.remove(victim)

    async def _unload(self, state: _ModelState, reason: str) -> None:
        instances, state.instances, free = state.instances, [], state.free
        state.free = asyncio.Queue()
        free.put_nowait(None)  # wakes the waiters of the old queue, one after another
        if not instances:
            return
        started = time.monotonic()
        await self._close_all(instances)
        log.info("unloaded model %s (%s) in %.2f s", state.cfg.name, reason, time.monotonic() - started)
        if self._metrics:
            self._metrics.loaded_models.set(len(self.loaded_names()))

    async def _close_all(self, instances: list[EngineHandle]) -> None:
        for handle in instances:
            try:
                await handle.close()
            except Exception:
                log.exception("closing an engine failed")

    async def unload(self, name: str) -> bool:
        """Unload ``name`` now if no request holds it and it is not preloaded; whether it was unloaded."""
        state = self._models[self.config(name).name]
        if not state.loaded or state.users or state.pinned:
            return False
        await self._unload(state, reason="asked to")
        return True

    async def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload models unused for ``idle_timeout`` seconds; returns their names."""
        timeout = self.settings.idle_timeout
        if not timeout:
            return []
        now = time.monotonic() if now is None else now
        done = []
        for state in list(self._models.values()):
            if state.loaded and state.users == 0 and not state.pinned and now - state.last_used >= timeout:
                await self._unload(state, reason=f"idle for {timeout:g} s")
                done.append(state.cfg.name)
        return done

    async def watchdog(self) -> None:
        """Runs for the app's lifetime: unload idle models."""
        interval = max(0.05, min(self.settings.idle_timeout / 4, 5.0))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.unload_idle()
            except Exception:
                log.exception("idle unload failed")

    async def close(self) -> None:
        for task in list(self._retiring):
            await task
        for state in self._models.values():
            await self._unload(state, reason="shutdown")
