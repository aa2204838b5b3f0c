"""The real default models (installed by ``models install --defaults``); skipped when their files are absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DEFAULT_MODELS, default_model_configs
from localai_aio.config import ServerSettings

pytestmark = [pytest.mark.model, pytest.mark.llama]
CHAT = "smollm2-135m-instruct"


@pytest.fixture
async def default_client(make_client, tmp_path: Path):  # noqa: ANN001
    configs = default_model_configs(CHAT)
    settings = ServerSettings(models_path=str(DEFAULT_MODELS), config_dir=str(tmp_path / "d"), threads=2)
    return await make_client(settings, model_configs=configs)


async def test_capital_of_france(default_client) -> None:  # noqa: ANN001
    resp = await default_client.post("/v1/chat/completions", json={
        "model": CHAT, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0, "max_tokens": 30})
    assert resp.status == 200
    body = await resp.json()
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["usage"]["prompt_tokens"] > 10


async def test_openai_aliases_reach_the_chat_model(default_client) -> None:  # noqa: ANN001
    for alias in ("gpt-4", "gpt-4o", "gpt-4o-mini"):
        resp = await default_client.post("/v1/chat/completions", json={
            "model": alias, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 30})
        body = await resp.json()
        assert body["model"] == alias
        assert "Paris" in body["choices"][0]["message"]["content"]


async def test_streamed_equals_plain_on_the_real_model(default_client) -> None:  # noqa: ANN001
    request = {"model": CHAT, "messages": [{"role": "user", "content": "Name three colors."}],
               "temperature": 0, "max_tokens": 24}
    plain = await (await default_client.post("/v1/chat/completions", json=request)).json()
    resp = await default_client.post("/v1/chat/completions", json={**request, "stream": True})
    import json

    raw = (await resp.read()).decode()
    chunks = [json.loads(b[6:]) for b in raw.split("\n\n") if b.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
