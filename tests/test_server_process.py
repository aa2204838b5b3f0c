"""The real server process, driven by the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from conftest import write_model_yaml


@pytest.fixture
def process_models(tmp_path: Path, tiny_gguf: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "tiny", context_size=256, parameters={"model": "tiny.gguf"})
    # A long context so that an unstopped generation would keep the only instance busy for seconds.
    write_model_yaml(models, "long", context_size=16384, parallel=1, parameters={"model": "tiny.gguf"})
    return models


def start(server_process, models: Path, tmp_path: Path, *extra: str):  # noqa: ANN001, ANN201
    return server_process("--models-path", str(models), "--config-dir", str(tmp_path / "data"), "--threads", "1",
                          *extra)


def test_openai_client_against_real_server(server_process, process_models: Path, tmp_path: Path) -> None:  # noqa: ANN001
    server = start(server_process, process_models, tmp_path, "--api-keys", "secret")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["long", "tiny"]
    assert client.models.retrieve("tiny").id == "tiny"

    with pytest.raises(openai.AuthenticationError) as auth, \
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as wrong:
        wrong.models.list()
    assert auth.value.status_code == 401

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "nope" in missing.value.message

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=9)
    assert bad.value.status_code == 400

    done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    assert done.choices[0].message.content == " Hello world! Hello"
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 4

    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices].count("length") == 1
    assert chunks[-1].usage.total_tokens == done.usage.total_tokens

    legacy = client.completions.create(model="tiny", prompt=[263], max_tokens=2, temperature=0)
    assert legacy.choices[0].text == " Hello world"
    client.close()


def test_client_disconnect_frees_the_instance(server_process, process_models: Path, tmp_path: Path) -> None:  # noqa: ANN001
    server = start(server_process, process_models, tmp_path, "--queue-size", "0")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"model": "long", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                       "stream": True})
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    resp.readline()
    # While that stream runs, the only instance is busy and there is no queue: a second request gets 503.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as busy:
        client.chat.completions.create(model="long", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert busy.value.status_code == 503
    assert busy.value.response.headers["Retry-After"] == "1"
    conn.close()  # the client leaves mid-stream
    answer = None
    for _ in range(50):
        try:
            answer = client.chat.completions.create(model="long", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=2, temperature=0)
            break
        except openai.InternalServerError:
            time.sleep(0.02)
    assert answer is not None, "the instance was not freed after the client left"
    assert answer.choices[0].message.content == " Hello world"
    client.close()
    assert "client left during a stream of long" in server.log()
    assert "unexpected error" not in server.log() and " 500 " not in server.log()  # leaving is not a fault


def test_sigterm_finishes_in_flight_requests(server_process, process_models: Path, tmp_path: Path) -> None:  # noqa: ANN001
    server = start(server_process, process_models, tmp_path)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    result: dict = {}

    def long_request() -> None:
        result["answer"] = client.chat.completions.create(
            model="long", messages=[{"role": "user", "content": "hi"}], max_tokens=3000, temperature=0)

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    worker.join(60)
    client.close()
    assert server.proc.wait(60) == 0
    assert result["answer"].usage.completion_tokens == 3000
    assert result["answer"].choices[0].finish_reason == "length"


def test_sigterm_drains_a_stream_and_refuses_new_connections(server_process, process_models: Path,
                                                              tmp_path: Path) -> None:  # noqa: ANN001
    import urllib.request

    server = start(server_process, process_models, tmp_path, "--shutdown-grace", "60")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    chunks: list = []

    def stream() -> None:
        for chunk in client.chat.completions.create(model="long", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=2000, temperature=0, stream=True):
            chunks.append(chunk)

    worker = threading.Thread(target=stream)
    worker.start()
    while len(chunks) < 5:
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):  # draining: a balancer's probe (or anyone) can no longer connect
        urllib.request.urlopen(server.url + "/readyz", timeout=2)
    worker.join(120)
    client.close()
    assert server.proc.wait(60) == 0
    assert chunks[-1].choices[0].finish_reason == "length"  # the stream ran to its end
    assert "draining: not accepting new connections" in server.log()


async def test_readiness_says_draining(make_client) -> None:  # noqa: ANN001
    from localai_aio.server import keys

    client = await make_client()
    assert (await client.get("/readyz")).status == 200
    client.server.app[keys.DRAINING].set()
    resp = await client.get("/readyz")
    assert resp.status == 503 and await resp.json() == {"status": "draining"}


def test_unwritable_config_dir_is_a_clear_error_at_start(tmp_path: Path, process_models: Path) -> None:
    import subprocess
    import sys

    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "localai_aio", "serve", "--models-path", str(process_models),
                           "--config-dir", str(blocker / "sub")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "config dir" in proc.stderr and "not writable" in proc.stderr
