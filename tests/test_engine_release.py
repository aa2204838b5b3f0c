"""A request whose client leaves gives its engine back only when the engine's thread is done with it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import pytest

from conftest import write_model_yaml
from localai_aio.config import ServerSettings
from localai_aio.registry import ModelRegistry

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


class Timeline:
    """When the work on an engine's thread ran, and when each request gave the engine back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.work: list[tuple[float, float]] = []
        self.released: list[float] = []
        self.working = threading.Event()
        original = ModelRegistry.acquire

        @contextlib.asynccontextmanager
        async def acquire(registry: ModelRegistry, name: str):  # noqa: ANN202
            try:
                async with original(registry, name) as handle:
                    yield handle
            finally:
                self.released.append(time.monotonic())

        monkeypatch.setattr(ModelRegistry, "acquire", acquire)

    def slow(self, fn):  # noqa: ANN001, ANN201
        """``fn`` preceded by 0.8 s of work that notices nothing: the slowest thing an engine call can be."""
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.monotonic()
            self.working.set()
            time.sleep(0.8)
            try:
                return fn(*args, **kwargs)
            finally:
                self.work.append((start, time.monotonic()))

        return wrapper


async def leave_during_work(client, timeline: Timeline, path: str, **kwargs) -> None:  # noqa: ANN001, ANN003
    job = asyncio.ensure_future(client.post(path, **kwargs))
    await asyncio.get_running_loop().run_in_executor(None, timeline.working.wait, 5)
    job.cancel()  # the client goes away while the engine's thread is busy for it
    with pytest.raises(asyncio.CancelledError):
        await job


@pytest.mark.llama
async def test_prompt_preparation(make_client, tmp_path: Path, tiny_gguf: Path, monkeypatch) -> None:  # noqa: ANN001
    from localai_aio.api import text_jobs as text

    timeline = Timeline(monkeypatch)
    monkeypatch.setattr(text, "_prepare", timeline.slow(text._prepare))
    models = tmp_path / "models"
    models.mkdir()
    (models / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "g", backend="llama-cpp", context_size=512, parameters={"model": "t.gguf"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                              parallel=1))
    await leave_during_work(client, timeline, CHAT, json={"model": "g", "messages": HI, "max_tokens": 3})
    timeline.working.clear()
    resp = await client.post(CHAT, json={"model": "g", "messages": HI, "max_tokens": 3})
    assert resp.status == 200
    assert (await resp.json())["usage"]["completion_tokens"] == 3
    for _ in range(100):  # llama.cpp prepares prompts off its decode thread: the two may overlap
        if len(timeline.work) == 2:
            break
        await asyncio.sleep(0.05)
    first_end = min(end for _, end in timeline.work)
    assert timeline.released[0] >= first_end  # the first request held the engine until its work ended
