"""The model registry with a minimal test backend (this tests the registry, not an engine)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from localai_aio.app import create_app
from localai_aio.backends.base import BackendError
from localai_aio.config import ConfigError, ModelConfig, ServerSettings
from localai_aio.errors import ModelLoadFailed, ModelNotFound, ServerBusy
from localai_aio.metrics import Metrics
from localai_aio.registry import ModelRegistry
from localai_aio.server import keys


class RecordingBackend:
    """Loads instantly or slowly, counts loads and closes, and can fail on demand."""

    def __init__(self, delay: float = 0.0, fail_times: int = 0, crash: bool = False):
        self.delay = delay
        self.fail_times = fail_times
        self.crash = crash
        self.loads: list[str] = []
        self.closed: list[str] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, cfg: ModelConfig, settings: ServerSettings) -> object:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        with self.lock:
            if self.fail_times:
                self.fail_times -= 1
                if self.crash:
                    raise RuntimeError("boom")
                raise BackendError("file is damaged")
            self.loads.append(cfg.name)
            n = len(self.loads)
        backend = self

        class Instance:
            number = n

            def close(self) -> None:
                backend.closed.append(cfg.name)

        return Instance()


def make_registry(backend: RecordingBackend, names=("a", "b", "c"), parallel: int = 1,  # noqa: ANN001
                  **settings: object) -> ModelRegistry:
    configs = {n: ModelConfig(name=n, backend="test", model_path=None, parallel=parallel) for n in names}
    return ModelRegistry(configs, ServerSettings(**settings), backends={"test": backend}, metrics=Metrics())


async def test_lazy_and_off_the_event_loop() -> None:
    backend = RecordingBackend()
    reg = make_registry(backend)
    assert backend.loads == [] and reg.loaded_names() == []
    async with reg.acquire("a") as handle:
        assert handle.engine.number == 1
    assert backend.loads == ["a"] and reg.loaded_names() == ["a"]
    assert backend.threads == {"engine-a-0"}  # the instance's own thread, not the event loop's


async def test_loaded_once_for_concurrent_requests() -> None:
    backend = RecordingBackend(delay=0.2)
    reg = make_registry(backend, queue_size=20)

    async def use() -> int:
        async with reg.acquire("a") as handle:
            await asyncio.sleep(0.01)
            return handle.engine.number

    numbers = await asyncio.gather(*(use() for _ in range(10)))
    assert backend.loads == ["a"]
    assert numbers == [1] * 10


async def test_pool_of_parallel_instances() -> None:
    backend = RecordingBackend()
    reg = make_registry(backend, parallel=2)
    async with reg.acquire("a") as first, reg.acquire("a") as second:
        assert {first.engine.number, second.engine.number} == {1, 2}
    assert backend.loads == ["a", "a"]


async def test_one_request_per_instance_and_queue_bound() -> None:
    backend = RecordingBackend()
    reg = make_registry(backend, queue_size=1)
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with reg.acquire("a"):
            order.append("holder")
            await release.wait()

    async def waiter() -> None:
        async with reg.acquire("a"):
            order.append("waiter")

    h = asyncio.create_task(holder())
    await asyncio.sleep(0.05)
    w = asyncio.create_task(waiter())
    await asyncio.sleep(0.05)
    assert order == ["holder"]  # the waiter queues instead of sharing the instance
    with pytest.raises(ServerBusy) as busy:
        async with reg.acquire("a"):
            pass
    assert busy.value.status == 503 and busy.value.headers["Retry-After"] == "1"
    release.set()
    await asyncio.gather(h, w)
    assert order == ["holder", "waiter"]


async def test_lru_unloads_least_recently_used_idle_model() -> None:
    backend = RecordingBackend()
    reg = make_registry(backend, max_loaded_models=2)
    for name in ("a", "b"):
        async with reg.acquire(name):
            pass
    async with reg.acquire("a"):  # a is now more recent than b
        pass
    async with reg.acquire("c"):
        pass
    assert sorted(reg.loaded_names()) == ["a", "c"]
    assert backend.closed == ["b"]


async def test_never_unloads_a_model_in_use() -> None:
    backend = RecordingBackend()
    reg = make_registry(backend, max_loaded_models=1)
    async with reg.acquire("a"):
        with pytest.raises(ServerBusy):
            async with reg.acquire("b"):
                pass
        assert reg.loaded_names() == ["a"]
    async with reg.acquire("b"):
        pass
    assert reg.loaded_names() == ["b"] and backend.closed == ["a"]


async def test_idle_models_unloaded() -> None:
    backend = RecordingBackend()
    reg = make_registry(backend, idle_timeout=0.2)
    async with reg.acquire("a"):
        pass
    assert await reg.unload_idle() == []  # not idle long enough
    assert await reg.unload_idle(now=time.monotonic() + 1) == ["a"]
    assert reg.loaded_names() == [] and backend.closed == ["a"]
    watchdog = asyncio.create_task(reg.watchdog())
    try:
        async with reg.acquire("b"):
            pass
        await asyncio.sleep(0.5)
        assert reg.loaded_names() == []
    finally:
        watchdog.cancel()


async def test_failed_load_is_retried_on_next_request() -> None:
    backend = RecordingBackend(fail_times=1)
    reg = make_registry(backend)
    with pytest.raises(ModelLoadFailed, match="Model 'a' cannot be loaded: file is damaged"):
        async with reg.acquire("a"):
            pass
    async with reg.acquire("a") as handle:
        assert handle.engine.number == 1


async def test_unexpected_load_exception_is_a_clear_load_error() -> None:
    reg = make_registry(RecordingBackend(fail_times=1, crash=True))
    with pytest.raises(ModelLoadFailed, match="cannot be loaded: RuntimeError"):
        async with reg.acquire("a"):
            pass


async def test_unknown_backend_and_unknown_model() -> None:
    configs = {"x": ModelConfig(name="x", backend="nope", model_path=None)}
    reg = ModelRegistry(configs, ServerSettings(), backends={"test": RecordingBackend()})
    with pytest.raises(ModelLoadFailed, match="backend 'nope' is not available"):
        await reg.load("x")
    with pytest.raises(ModelNotFound):
        reg.config("y")


async def test_aliases_resolve_to_their_model() -> None:
    configs = {"chat": ModelConfig(name="chat", backend="test", model_path=None, aliases=("gpt-4",))}
    reg = ModelRegistry(configs, ServerSettings(), backends={"test": RecordingBackend()})
    assert reg.config("gpt-4").name == "chat"
    async with reg.acquire("gpt-4"):
        pass
    assert reg.loaded_names() == ["chat"]


async def test_preload_and_readyz(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    backend = RecordingBackend(delay=0.3)
    configs = {"a": ModelConfig(name="a", backend="test", model_path=None)}
    settings = ServerSettings(models_path=str(tmp_path), config_dir=str(tmp_path / "d"), preload_models=("a",))
    client = await make_client(settings, model_configs=configs, backends={"test": backend})
    resp = await client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["pending"] == ["a"]
    await asyncio.sleep(0.5)
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["loaded"] == ["a"]
    assert backend.loads == ["a"]
    metrics = await (await client.get("/metrics")).text()
    assert 'localai_model_load_duration_seconds_count{model="a"} 1.0' in metrics
    assert "localai_loaded_models 1.0" in metrics


async def test_overload_renders_503_with_retry_after(tmp_path: Path, aiohttp_client) -> None:  # noqa: ANN001
    app = create_app(ServerSettings(models_path=str(tmp_path), config_dir=str(tmp_path / "d")))

    async def busy(request: web.Request) -> web.Response:
        raise ServerBusy("Model 'a' is busy", retry_after=3)

    app.router.add_get("/v1/busy", busy)
    client = await aiohttp_client(app)
    resp = await client.get("/v1/busy")
    assert resp.status == 503 and resp.headers["Retry-After"] == "3"
    assert (await resp.json())["error"] == {"message": "Model 'a' is busy", "type": "server_error",
                                            "param": None, "code": "server_overloaded"}


async def test_cancelled_waiters_never_strand_a_free_instance() -> None:
    """Waiters cancelled at random, also just as they are woken: every other request still gets the
    instance, and it is free at the end."""
    import random

    reg = make_registry(RecordingBackend(), queue_size=100)
    rng = random.Random(7)
    done: list[int] = []

    async def use(i: int) -> None:
        async with reg.acquire("a"):
            await asyncio.sleep(rng.choice((0, 0.001, 0.003)))
        done.append(i)

    for _ in range(5):
        tasks = [asyncio.ensure_future(use(i)) for i in range(30)]
        doomed = rng.sample(tasks, 12)
        for task in doomed:
            await asyncio.sleep(rng.choice((0, 0, 0.001)))
            task.cancel()
        finished, pending = await asyncio.wait(tasks, timeout=10)
        assert not pending, "a waiter was left beside a free instance"
        survivors = [t for t in tasks if not t.cancelled()]
        assert all(t.exception() is None for t in survivors)
    slot = reg._models["a"]
    assert slot.users == 0 and slot.free.qsize() == 1


async def test_preloaded_models_are_pinned(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    backend = RecordingBackend()
    configs = {n: ModelConfig(name=n, backend="test", model_path=None) for n in ("a", "b")}
    settings = ServerSettings(models_path=str(tmp_path), config_dir=str(tmp_path / "d"), preload_models=("a",),
                              idle_timeout=0.1, max_loaded_models=1)
    client = await make_client(settings, model_configs=configs, backends={"test": backend})
    for _ in range(50):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # several idle timeouts
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["loaded"] == ["a"]
    reg = client.server.app[keys.REGISTRY]
    with pytest.raises(ServerBusy, match="in use or preloaded"):  # a is not evicted to make room for b
        async with reg.acquire("b"):
            pass
    assert backend.closed == [] and reg.loaded_names() == ["a"]


async def test_failed_preload_is_reported(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    backend = RecordingBackend(fail_times=1)
    configs = {"a": ModelConfig(name="a", backend="test", model_path=None)}
    settings = ServerSettings(models_path=str(tmp_path), config_dir=str(tmp_path / "d"), preload_models=("a",))
    client = await make_client(settings, model_configs=configs, backends={"test": backend})
    for _ in range(50):
        resp = await client.get("/readyz")
        if (await resp.json())["status"] != "loading":
            break
        await asyncio.sleep(0.05)
    assert resp.status == 503
    assert await resp.json() == {"status": "failed", "pending": [],
                                 "failed": {"a": "Model 'a' cannot be loaded: file is damaged"}}
    async with client.server.app[keys.REGISTRY].acquire("a"):  # a later load succeeds: ready again
        pass
    assert (await client.get("/readyz")).status == 200


def test_unknown_preload_name_is_a_startup_error(tmp_path: Path) -> None:
    configs = {"chat": ModelConfig(name="chat", backend="test", model_path=None, aliases=("gpt-4",))}
    ok = ServerSettings(models_path=str(tmp_path), config_dir=str(tmp_path / "d"), preload_models=("gpt-4",))
    create_app(ok, model_configs=configs)
    with pytest.raises(ConfigError, match=r"^--preload-models names no configured model: chta \(configured: chat\)$"):
        create_app(ok.replace(preload_models=("chta",)), model_configs=configs)
