"""Ollama's API (``/api/...``) with the official ``ollama`` client against a real server, and with aiohttp's
test client where the raw wire matters (NDJSON lines, error bodies, keys).

The tiny model answers a ChatML prompt with " Hello world! Hello world! ..." (one token per word or "!"),
so answers and counts are exact; the stand-in embedder's vectors are computed here from its table.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import numpy as np
import ollama
import pytest

from conftest import DEFAULT_MODELS, ServerProcess, default_model_configs, write_model_yaml
from localai_aio.api.chat_jobs import ArgumentsDelta, CallStart, TurnEnd
from localai_aio.api.ollama.generation import Reply, chat_messages
from localai_aio.api.ollama.shared import Clock
from localai_aio.api.text_jobs import Prepared
from localai_aio.config import ServerSettings
from test_embeddings import reference
from test_gallery import PAYLOAD, build_wheel, write_gallery
from tiny_models import CHATML, write_standin_embedder, write_tiny_gguf

pytestmark = pytest.mark.llama

HI = [{"role": "user", "content": "hi"}]
HI_PROMPT_TOKENS = 24  # "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" in the tiny vocabulary
GREEDY = {"temperature": 0, "num_predict": 5}
WEATHER_SCHEMA = {"type": "object", "properties": {"location": {"type": "string", "maxLength": 12},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["location", "unit"]}
FIGURES = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration")


def write_models(models: Path, gguf: Path) -> tuple[Path, np.ndarray]:
    models.mkdir()
    (models / "t.gguf").write_bytes(gguf.read_bytes())
    write_model_yaml(models, "tiny", backend="llama-cpp", context_size=1024, parameters={"model": "t.gguf"},
                     aliases=["tiny-alias"])
    (models / "small.Q8_0.gguf").write_bytes(gguf.read_bytes())
    write_model_yaml(models, "quant", backend="llama-cpp", context_size=256, parameters={"model": "small.Q8_0.gguf"})
    opening = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    write_tiny_gguf(models / "think.gguf", chat_template=opening)
    write_model_yaml(models, "thinker", backend="llama-cpp", context_size=512, parameters={"model": "think.gguf"})
    write_model_yaml(models, "plain", backend="llama-cpp", context_size=512, parameters={"model": "think.gguf"},
                     reasoning={"disable": True})
    _, table = write_standin_embedder(models / "standin")
    write_model_yaml(models, "emb", backend="onnx-embeddings", parameters={"model": "standin"})
    return models, table


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):  # noqa: ANN201
    root = tmp_path_factory.mktemp("ollama")
    models, table = write_models(root / "models", tiny_gguf)
    process = ServerProcess(["--models-path", str(models), "--config-dir", str(root / "data"), "--threads", "1"],
                            cwd=root)
    process.start(root / "server.log")
    process.table = table  # type: ignore[attr-defined]
    process.models = models  # type: ignore[attr-defined]
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=120) as made:
        yield made


@pytest.fixture
def make_ollama() -> Iterator[Callable[[str], ollama.Client]]:
    """Clients for servers a test starts itself, each closed when the test ends."""
    made: list[ollama.Client] = []

    def make(url: str) -> ollama.Client:
        made.append(ollama.Client(host=url, timeout=300))
        return made[-1]

    yield make
    for one in made:
        one.close()


def real_figures(answer: ollama.ChatResponse | ollama.GenerateResponse) -> None:
    figures = {name: getattr(answer, name) for name in FIGURES}
    assert all(isinstance(v, int) and v >= 0 for v in figures.values()), figures
    assert figures["eval_duration"] > 0 and figures["prompt_eval_duration"] > 0
    assert figures["total_duration"] >= figures["load_duration"] + figures["prompt_eval_duration"] \
        + figures["eval_duration"]


def test_chat_plain(client: ollama.Client) -> None:
    answer = client.chat(model="tiny", messages=HI, options=GREEDY, stream=False)
    assert answer.message.role == "assistant" and answer.message.content == " Hello world! Hello world"
    assert answer.done and answer.done_reason == "length" and answer.model == "tiny"
    assert answer.prompt_eval_count == HI_PROMPT_TOKENS and answer.eval_count == 5
    real_figures(answer)
    stopped = client.chat(model="tiny:latest", messages=HI, options={"temperature": 0, "stop": ["!"]})
    assert stopped.message.content == " Hello world" and stopped.done_reason == "stop"
    assert stopped.model == "tiny:latest"


def test_chat_streamed(client: ollama.Client) -> None:
    chunks = list(client.chat(model="tiny-alias", messages=HI, options={"temperature": 0, "num_predict": 9},
                              stream=True))
    *pieces, last = chunks
    assert all(not c.done and c.message.role == "assistant" for c in pieces)
    assert "".join(c.message.content for c in pieces) == " Hello world! Hello world! Hello world!"
    assert len(pieces) == last.eval_count == 9  # one chunk per token
    assert last.done and last.done_reason == "length" and last.message.content == ""
    assert last.prompt_eval_count == HI_PROMPT_TOKENS
    real_figures(last)


def test_chat_format_schema(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["ok", "n"]}
    answer = client.chat(model="tiny", messages=HI, format=schema, options={"temperature": 0, "num_predict": 100})
    assert answer.done_reason == "stop"
    jsonschema.validate(json.loads(answer.message.content), schema)
    streamed = list(client.chat(model="tiny", messages=HI, format=schema, stream=True,
                                options={"temperature": 0, "num_predict": 100}))
    assert "".join(c.message.content for c in streamed) == answer.message.content


def test_tool_call_and_result_reach_the_template(client: ollama.Client) -> None:
    """The tiny model never chooses a call on its own; what a client sends back after one is checked here
    (the real model's own call: ``test_real_model_calls_a_tool``)."""
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                                                "parameters": WEATHER_SCHEMA}}
    history = [{"role": "user", "content": "What's the weather in Boston?"},
               {"role": "assistant", "content": "",
                "tool_calls": [{"function": {"name": "get_weather",
                                             "arguments": {"location": "Boston", "unit": "celsius"}}}]},
               {"role": "tool", "content": "22 degrees and sunny", "tool_name": "get_weather"}]
    answer = client.chat(model="tiny", messages=history, tools=[weather], options=GREEDY)
    shorter = client.chat(model="tiny", messages=history[:1], tools=[weather], options=GREEDY)
    # the call and its result are in the prompt: more tokens than the question alone
    assert answer.prompt_eval_count > shorter.prompt_eval_count + 10
    assert answer.done and answer.eval_count == 5


def test_think_splits_reasoning(client: ollama.Client) -> None:
    answer = client.chat(model="thinker", messages=HI, think=True, options=GREEDY)
    assert answer.message.thinking == " Hello world! Hello world" and answer.message.content == ""
    streamed = list(client.chat(model="thinker", messages=HI, think=True, options=GREEDY, stream=True))
    assert "".join(c.message.thinking or "" for c in streamed) == " Hello world! Hello world"
    hidden = client.chat(model="thinker", messages=HI, think=False, options=GREEDY)
    assert hidden.message.thinking is None and hidden.message.content == ""
    assert "thinking" in client.show("thinker").capabilities and "thinking" not in client.show("tiny").capabilities
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="plain", messages=HI, think=True)
    assert refused.value.status_code == 400 and "does not support thinking" in refused.value.error


def test_generate_with_context(client: ollama.Client) -> None:
    first = client.generate(model="tiny", prompt="hi", options=GREEDY)
    assert first.response == " Hello world! Hello world" and first.done_reason == "length"
    # Ollama's context: the prompt's tokens, then the answer's text tokenized again
    assert first.prompt_eval_count == HI_PROMPT_TOKENS and len(first.context) > HI_PROMPT_TOKENS + 5
    real_figures(first)
    second = client.generate(model="tiny", prompt="hi", context=first.context, options=GREEDY)
    # the second prompt is the first one, its answer, and the new turn (without a second BOS)
    assert second.prompt_eval_count == len(first.context) + HI_PROMPT_TOKENS - 1
    assert list(second.context[:len(first.context)]) == list(first.context)
    chunks = list(client.generate(model="tiny", prompt="hi", options=GREEDY, stream=True))
    assert "".join(c.response for c in chunks) == first.response and chunks[-1].context == first.context
    with_system = client.generate(model="tiny", prompt="hi", system="Be brief.", options=GREEDY)
    assert with_system.prompt_eval_count > first.prompt_eval_count


def test_generate_raw(client: ollama.Client) -> None:
    raw = client.generate(model="tiny", prompt="<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", raw=True,
                          options=GREEDY)
    assert raw.response == " Hello world! Hello world" and raw.prompt_eval_count == HI_PROMPT_TOKENS
    assert raw.context is None


def test_generate_suffix_needs_fill_in_the_middle_tokens(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="tiny", prompt="def f(", suffix="return 1")
    assert refused.value.status_code == 400 and "fill-in-the-middle" in refused.value.error


def test_empty_prompt_loads_and_keep_alive_zero_unloads(client: ollama.Client) -> None:
    unloaded = client.generate(model="thinker", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert "thinker:latest" not in [m.model for m in client.ps().models]
    loaded = client.generate(model="thinker")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert "thinker:latest" in [m.model for m in client.ps().models]
    client.chat(model="thinker", messages=HI, options=GREEDY, keep_alive=0)
    assert "thinker:latest" not in [m.model for m in client.ps().models]
    chat_load = client.chat(model="thinker", messages=[])
    assert chat_load.done_reason == "load" and chat_load.message.content == ""
    first = client.chat(model="thinker", messages=HI, options=GREEDY)
    assert first.load_duration == 0  # already loaded


def test_embed(client: ollama.Client, server: ServerProcess) -> None:
    texts = ["the cat", "a dog barks"]
    answer = client.embed(model="emb", input=texts)
    assert answer.model == "emb" and len(answer.embeddings) == 2
    for vector, text in zip(answer.embeddings, texts, strict=True):
        np.testing.assert_allclose(vector, reference(server.models, server.table, text), rtol=1e-5, atol=1e-6)
    assert answer.prompt_eval_count == 4 + 5  # [CLS] and [SEP] too
    one = client.embed(model="emb:latest", input="the cat", dimensions=3)
    full = reference(server.models, server.table, "the cat")[:3]
    np.testing.assert_allclose(one.embeddings[0], full / np.linalg.norm(full), rtol=1e-5, atol=1e-6)
    old = client.embeddings(model="emb", prompt="the cat")
    np.testing.assert_allclose(old.embedding, reference(server.models, server.table, "the cat"), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model="emb", input="the cat", dimensions=9)
    assert refused.value.status_code == 400 and "8-dimensional" in refused.value.error


def test_list_show_ps_version(client: ollama.Client, server: ServerProcess) -> None:
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"tiny:latest", "tiny-alias:latest", "quant:latest", "thinker:latest",
                           "plain:latest", "emb:latest"}
    tiny = listed["tiny:latest"]
    assert tiny.size == (server.models / "t.gguf").stat().st_size and len(tiny.digest) == 64
    assert tiny.details.format == "gguf" and tiny.details.family == "llama"
    shown = client.show("tiny")
    assert shown.details.family == "llama" and shown.capabilities == ["completion"]
    assert "<|im_start|>" in shown.template and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["general.parameter_count"] > 0
    assert shown.modelfile == "# Modelfile of tiny, as this server serves it\nFROM t.gguf"
    assert client.show("emb").capabilities == ["embedding"]
    quant = client.show("quant:q8_0")  # the quantization its file name says is a tag too
    assert quant.details.quantization_level == "Q8_0" and listed["quant:latest"].details.quantization_level == "Q8_0"
    client.chat(model="tiny", messages=HI, options=GREEDY)
    running = {m.model: m for m in client.ps().models}
    assert running["tiny:latest"].size == tiny.size and running["tiny:latest"].context_length == 1024
    assert running["tiny:latest"].expires_at is not None
    assert client._client.get("/api/version").json() == {"version": "0.12.6"}  # noqa: SLF001
    assert client._client.head("/").status_code == 200  # noqa: SLF001


def test_errors_in_ollamas_shape(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope", messages=HI)
    assert missing.value.status_code == 404 and missing.value.error == 'model "nope" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as wrong_tag:
        client.chat(model="tiny:q8_0", messages=HI)
    assert wrong_tag.value.status_code == 404
    http = client._client  # noqa: SLF001
    bad = http.post("/api/chat", json={"model": "tiny", "messages": HI, "options": {"temperature": 9}})
    assert bad.status_code == 400 and set(bad.json()) == {"error"} and "temperature" in bad.json()["error"]
    images = http.post("/api/generate", json={"model": "tiny", "prompt": "hi", "images": ["aGk="]})
    assert images.status_code == 400
    assert images.json() == {"error": "'images': this server's chat models take no images"}
    no_model = http.post("/api/generate", json={"prompt": "hi"})
    assert no_model.status_code == 400 and set(no_model.json()) == {"error"}
    for path in ("/api/create", "/api/copy", "/api/push"):
        refused = http.post(path, json={"model": "tiny"})
        assert refused.status_code == 501 and "not supported" in refused.json()["error"]
    lines = http.post("/api/chat", json={"model": "tiny", "messages": HI, "options": GREEDY})
    assert lines.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line)["done"] for line in lines.text.splitlines()] == [False] * 5 + [True]


def test_metrics_count_the_routes(client: ollama.Client, server: ServerProcess) -> None:
    client.chat(model="tiny", messages=HI, options=GREEDY)
    metrics = client._client.get("/metrics").text  # noqa: SLF001
    assert 'localai_http_requests_total{method="POST",route="/api/chat",status="200"}' in metrics
    assert 'localai_generated_tokens_total{model="tiny"}' in metrics


def test_tool_calls_in_ollamas_shape() -> None:
    """A turn with a call, as the chat code says it, shaped as Ollama's chunks and answer (which the
    official client reads back)."""
    reply = Reply("m", "message", None, Clock())
    assert reply.step(Prepared(7, [0], [0])) == []
    events = [CallStart("call_1", "get_weather"), ArgumentsDelta('{"location": "Bos'), ArgumentsDelta('ton"}'),
              TurnEnd("tool_calls", 12)]
    chunks = [chunk for event in events for chunk in reply.step(event)]
    call = {"function": {"name": "get_weather", "arguments": {"location": "Boston"}}}
    assert len(chunks) == 1 and chunks[0]["message"] == {"role": "assistant", "content": "", "tool_calls": [call]}
    whole = reply.last(True)
    assert whole["message"]["tool_calls"] == [call] and whole["done_reason"] == "stop"
    assert (whole["prompt_eval_count"], whole["eval_count"]) == (7, 12)
    parsed = ollama.ChatResponse.model_validate(whole)
    assert parsed.message.tool_calls[0].function.arguments == {"location": "Boston"}


def test_tool_results_answer_their_calls() -> None:
    history = [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "a", "arguments": {"x": 1}}}, {"function": {"name": "b", "arguments": {}}}]},
        {"role": "tool", "content": "B", "tool_name": "b"}, {"role": "tool", "content": "A"}]
    shaped = chat_messages(history)
    assert shaped[0]["tool_calls"][0] == {"id": "call_0_0", "type": "function",
                                          "function": {"name": "a", "arguments": '{"x": 1}'}}
    assert [(m["tool_call_id"], m["name"], m["content"]) for m in shaped[1:]] == [("call_0_1", "b", "B"),
                                                                                 ("call_0_0", "a", "A")]


def test_langchain_ollama_classes(server: ServerProcess) -> None:
    """LangChain's ``ChatOllama`` and ``OllamaEmbeddings``, unchanged, against this server."""
    langchain_ollama = pytest.importorskip("langchain_ollama")
    chat = langchain_ollama.ChatOllama(model="tiny", base_url=server.url, temperature=0, num_predict=5)
    answer = chat.invoke("hi")
    assert answer.content == " Hello world! Hello world"
    assert answer.usage_metadata["output_tokens"] == 5
    assert "".join(chunk.content for chunk in chat.stream("hi")) == " Hello world! Hello world"
    embeddings = langchain_ollama.OllamaEmbeddings(model="emb", base_url=server.url)
    texts = ["the cat", "a dog barks"]
    for vector, text in zip(embeddings.embed_documents(texts), texts, strict=True):
        np.testing.assert_allclose(vector, reference(server.models, server.table, text), rtol=1e-5, atol=1e-6)
    for one in (chat._client, embeddings._client):  # their ollama clients, which LangChain never closes
        one.close()


async def test_keys_and_admin_routes(make_client, tmp_path: Path, tiny_gguf: Path) -> None:  # noqa: ANN001
    models, _ = write_models(tmp_path / "models", tiny_gguf)
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                              api_keys=("user", "admin"), admin_api_keys=("admin",)))
    anonymous = await client.get("/api/tags")
    assert anonymous.status == 401 and set(await anonymous.json()) == {"error"}
    user = {"Authorization": "Bearer user"}
    assert (await client.get("/api/tags", headers=user)).status == 200
    refused = await client.delete("/api/delete", json={"model": "tiny"}, headers=user)
    assert refused.status == 403 and set(await refused.json()) == {"error"}
    admin = {"Authorization": "Bearer admin"}
    deleted = await client.delete("/api/delete", json={"model": "tiny"}, headers=admin)
    assert deleted.status == 200 and not (models / "tiny.yaml").exists()
    names = [m["model"] for m in (await (await client.get("/api/tags", headers=admin)).json())["models"]]
    assert "tiny:latest" not in names and "thinker:latest" in names
    gone = await client.delete("/api/delete", json={"model": "tiny"}, headers=admin)
    assert gone.status == 404 and (await gone.json()) == {"error": 'model "tiny" not found, try pulling it first'}


def test_pull_and_delete(server_process, make_ollama, tmp_path: Path) -> None:  # noqa: ANN001
    """A gallery entry from a local wheel (``test_gallery``'s), pulled and deleted with the client."""
    build_wheel(tmp_path / "wheels")
    gallery = write_gallery(tmp_path / "g.yaml", hashlib.sha256(PAYLOAD).hexdigest(), name="small")
    models = tmp_path / "models"
    models.mkdir()
    server = server_process("--models-path", str(models), "--config-dir", str(tmp_path / "d"),
                            env={"LOCALAI_GALLERY": str(gallery), "PIP_FIND_LINKS": str(tmp_path / "wheels"),
                                 "PIP_NO_INDEX": "1"})
    client = make_ollama(server.url)
    with pytest.raises(ollama.ResponseError) as missing:
        client.pull("nothing-like-it")
    assert missing.value.status_code == 404 and "not in this server's gallery" in missing.value.error
    statuses = [p.status for p in client.pull("small:latest", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "fetch 1/1 model.bin" in statuses
    assert (models / "small" / "model.bin").read_bytes() == PAYLOAD
    assert [m.model for m in client.list().models] == ["small:latest", "gpt-4:latest"]
    assert client.pull("small", stream=False).status == "success"  # already installed
    assert client.delete("small").status == "success"
    assert client.list().models == [] and not (models / "small").exists() and not (models / "small.yaml").exists()
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete("small")
    assert gone.value.status_code == 404


@pytest.mark.model
def test_real_models(server_process, make_ollama, tmp_path: Path) -> None:  # noqa: ANN001
    default_model_configs("smollm2-135m-instruct", "all-minilm-l6-v2")
    server = server_process("--models-path", str(DEFAULT_MODELS), "--config-dir", str(tmp_path / "d"))
    client = make_ollama(server.url)
    vectors = client.embed(model="all-minilm-l6-v2", input=["a cat", "a kitten"]).embeddings
    assert [len(v) for v in vectors] == [384, 384]
    assert float(np.dot(vectors[0], vectors[1])) > 0.7
    answer = client.chat(model="smollm2-135m-instruct", options={"temperature": 0, "num_predict": 200},
                         messages=[{"role": "user", "content": "Return a JSON object with the keys name and age "
                                                               "for a cat named Tom who is 3."}],
                         format={"type": "object", "properties": {"name": {"type": "string"},
                                                                  "age": {"type": "integer"}},
                                 "required": ["name", "age"]})
    assert json.loads(answer.message.content) == {"name": "Tom", "age": 3}
