"""No small request holds a model: a conversation of 20,000 messages with ``truncation: auto`` is cut by
bisection (a handful of renders, each of at most a context's worth of messages) instead of one message
at a time; prompts are built off the decode thread; and a conversation has a bounded number of messages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import write_model_yaml
from localai_aio.config import ServerSettings
from localai_aio.text.prompts import MAX_MESSAGES

pytestmark = pytest.mark.llama


@pytest.fixture
async def small(make_client, tmp_path: Path, tiny_gguf: Path):  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    (models / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "t", backend="llama-cpp", context_size=512, parameters={"model": "t.gguf"})
    return await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))


async def test_a_flood_of_messages_is_truncated_in_a_few_renders(small, monkeypatch) -> None:  # noqa: ANN001
    from localai_aio.api import text_jobs as text
    from localai_aio.api.openai import responses

    renders: list[int] = []
    original = text.prompt_fit

    async def counted(app, job):  # noqa: ANN001, ANN202
        found = await original(app, job)
        renders.append(found[0])
        return found

    monkeypatch.setattr(responses, "prompt_fit", counted)
    flood = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(20_000)]
    flood[-1] = {"role": "user", "content": "the last question"}
    resp = await small.post("/v1/responses", json={"model": "t", "input": flood, "truncation": "auto",
                                                   "max_output_tokens": 3, "store": False})
    body = await resp.json()
    assert resp.status == 200, body
    assert 0 < body["usage"]["input_tokens"] < 512
    # one measure of the whole conversation, then a bisection over the last 512 messages at most
    assert len(renders) <= 2 + math.ceil(math.log2(512))
    assert renders[0] > 512 and max(renders[1:]) < 20 * 512  # no probe renders more than a context's worth
    assert body["usage"]["input_tokens"] >= 512 - 3 * 10  # it kept as much as fits (each message ~10 tokens)


async def test_too_many_messages_are_refused_before_any_work(small, monkeypatch) -> None:  # noqa: ANN001
    from localai_aio.text import prompts

    assert MAX_MESSAGES == 50_000
    monkeypatch.setattr(prompts, "MAX_MESSAGES", 10)  # the same check, without a 2 MB request per route
    many = [{"role": "user", "content": "x"}] * 11
    for path, body in (("/v1/chat/completions", {"messages": many}), ("/v1/responses", {"input": many}),
                       ("/v1/messages", {"messages": many, "max_tokens": 3})):
        resp = await small.post(path, json={"model": "t", **body})
        assert resp.status == 400, path
        assert "Too many messages: 11; at most 10 per conversation" in await resp.text()
    ok = await small.post("/v1/chat/completions", json={"model": "t", "messages": many[:10], "max_tokens": 2})
    assert ok.status == 200
