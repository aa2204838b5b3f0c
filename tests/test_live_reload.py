"""Live reload: model YAMLs added, changed and removed while requests keep coming, through
POST /models/reload, the directory watcher and SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import write_model_yaml
from localai_aio.config import ServerSettings

pytestmark = pytest.mark.llama
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def models(tmp_path: Path, tiny_gguf: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(folder, "a", backend="llama-cpp", context_size=512, parameters={"model": "t.gguf"})
    return folder


async def chat(client, model: str) -> tuple[int, dict]:  # noqa: ANN001
    resp = await client.post(CHAT, json={"model": model, "messages": HI, "max_tokens": 6, "temperature": 0})
    return resp.status, await resp.json()


async def test_requests_keep_succeeding_while_yamls_come_change_and_go(make_client, models: Path, tmp_path: Path,
                                                                      caplog) -> None:  # noqa: ANN001
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                              watch_models=False))
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:  # two clients talking to "a" the whole time
        while not stop.is_set():
            status, _ = await chat(client, "a")
            statuses.append(status)

    workers = [asyncio.create_task(load()) for _ in range(2)]
    await asyncio.sleep(0.3)

    write_model_yaml(models, "b", backend="llama-cpp", context_size=512, parameters={"model": "t.gguf"})
    body = await (await client.post("/models/reload")).json()
    assert body == {"added": ["b"], "changed": [], "removed": [], "problems": []}
    assert (await chat(client, "b"))[0] == 200

    caplog.set_level(logging.INFO, logger="localai_aio.registry")
    write_model_yaml(models, "a", backend="llama-cpp", context_size=512, parameters={"model": "t.gguf"},
                     aliases=["a-new"], system_prompt="Be brief.")
    body = await (await client.post("/models/reload")).json()
    assert body["changed"] == ["a"] and body["added"] == [] and body["removed"] == []
    status, answer = await chat(client, "a-new")  # the new config's alias
    assert status == 200 and answer["model"] == "a-new"

    (models / "b.yaml").unlink()
    body = await (await client.post("/models/reload")).json()
    assert body["removed"] == ["b"]
    status, error = await chat(client, "b")
    assert status == 404 and error["error"]["code"] == "model_not_found"

    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)
    assert len(statuses) > 10 and set(statuses) == {200}  # not one request failed
    # the old "a" was unloaded once its last request was done
    for _ in range(50):
        if any("unloaded model a (its config changed" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the old config's engine was not unloaded")


async def test_a_broken_yaml_keeps_the_last_good_config(make_client, models: Path, tmp_path: Path) -> None:  # noqa: ANN001
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                              watch_models=False))
    (models / "a.yaml").write_text("name: a\nbackend: [unclosed\n")
    body = await (await client.post("/models/reload")).json()
    assert body["removed"] == [] and len(body["problems"]) == 1 and "a.yaml" in body["problems"][0]
    assert (await chat(client, "a"))[0] == 200


async def test_the_watcher_serves_a_new_yaml(make_client, models: Path, tmp_path: Path) -> None:  # noqa: ANN001
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    await asyncio.sleep(0.3)  # the watcher is up
    staged = tmp_path / "c.yaml"  # written elsewhere, then moved in whole, as `models install` does
    staged.write_text(yaml.safe_dump({"name": "c", "backend": "llama-cpp", "parameters": {"model": "t.gguf"}}))
    staged.replace(models / "c.yaml")
    for _ in range(100):
        ids = {m["id"] for m in (await (await client.get("/v1/models")).json())["data"]}
        if "c" in ids:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the new model was not served")
    assert (await chat(client, "c"))[0] == 200


async def test_reload_needs_a_key_when_keys_are_set(make_client, models: Path, tmp_path: Path) -> None:  # noqa: ANN001
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"),
                                              api_keys=("secret",), watch_models=False))
    assert (await client.post("/models/reload")).status == 401
    resp = await client.post("/models/reload", headers={"Authorization": "Bearer secret"})
    assert resp.status == 200


def test_sighup_reloads_a_running_server(server_process, models: Path, tmp_path: Path) -> None:  # noqa: ANN001
    server = server_process("--models-path", str(models), "--config-dir", str(tmp_path / "d"), "--threads", "1",
                            "--watch-models", "false")
    write_model_yaml(models, "d", backend="llama-cpp", parameters={"model": "t.gguf"})
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with urllib.request.urlopen(server.url + "/v1/models", timeout=5) as resp:
            if '"d"' in resp.read().decode():
                return
        time.sleep(0.2)
    pytest.fail("SIGHUP did not serve the new model")
