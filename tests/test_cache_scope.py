"""The prompt cache is partitioned by API key: ``cached_tokens`` (and so the time to first token) only ever
reveals a caller's own prefixes; ``cache_salt`` partitions one key's requests further."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_model_yaml
from localai_aio.config import ServerSettings

pytestmark = pytest.mark.llama

PROMPT = [{"role": "system", "content": "You are a careful assistant who answers about the capital of France."},
          {"role": "user", "content": "the capital of France is Paris"}]


@pytest.fixture
async def keyed(make_client, tmp_path: Path, tiny_gguf: Path):  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    (models / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "t", backend="llama-cpp", context_size=512, parallel=2, parameters={"model": "t.gguf"})
    return await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                            api_keys=("user-a", "user-b"), admin_api_keys=("admin",)))


async def cached(client, key: str, **extra: object) -> int:  # noqa: ANN001
    resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": "t", "messages": PROMPT, "max_tokens": 2, "temperature": 0, **extra})
    assert resp.status == 200, await resp.text()
    usage = (await resp.json())["usage"]
    assert usage["prompt_tokens"] > 20
    return usage["prompt_tokens_details"]["cached_tokens"]


async def test_cached_tokens_never_cross_keys(keyed) -> None:  # noqa: ANN001
    assert await cached(keyed, "user-a") == 0
    assert await cached(keyed, "user-b") == 0  # the same prompt, computed again for another key
    assert await cached(keyed, "user-a") > 20  # its own prefix
    assert await cached(keyed, "user-b") > 20
    assert await cached(keyed, "admin") == 0  # admins share one scope of their own
    assert await cached(keyed, "admin") > 20


async def test_cache_salt_keeps_one_keys_prompts_apart(keyed) -> None:  # noqa: ANN001
    assert await cached(keyed, "user-a", cache_salt="tenant-1") == 0
    assert await cached(keyed, "user-a", cache_salt="tenant-2") == 0
    assert await cached(keyed, "user-a") == 0
    assert await cached(keyed, "user-a", cache_salt="tenant-1") > 20
    resp = await keyed.post("/v1/chat/completions", headers={"Authorization": "Bearer user-a"},
                            json={"model": "t", "messages": PROMPT, "cache_salt": 5})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "cache_salt"
