"""Anthropic's Messages API on the tiny GGUF, with the official ``anthropic`` client against a real server
and with aiohttp's test client where the raw wire matters (SSE framing, error envelopes).

The tiny model answers a ChatML prompt with " Hello world! Hello world! ..." (one token per word or
"!"), so answers are exact; random weights still make valid tool calls under the grammar.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import jsonschema
import pytest

from conftest import ServerProcess, write_model_yaml
from localai_aio.api.anthropic import messages as messages_api
from localai_aio.config import ServerSettings
from localai_aio.errors import InternalError

pytestmark = pytest.mark.llama

MODEL = "tiny"
HI = [{"role": "user", "content": "hi"}]
HI_PROMPT_TOKENS = 24  # "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" in the tiny vocabulary
WEATHER_SCHEMA = {"type": "object", "properties": {"location": {"type": "string", "maxLength": 12},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["location", "unit"]}
WEATHER = {"name": "get_weather", "description": "Get the current weather", "input_schema": WEATHER_SCHEMA}
ASK = [{"role": "user", "content": "What's the weather in Boston?"}]
#: Sampling fields go in ``extra_body``: recent SDKs dropped them from the signature, the API still takes them.
GREEDY = {"extra_body": {"temperature": 0}}
STREAM_ORDER = ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
                "message_delta", "message_stop"]


def write_models(models: Path, gguf: Path) -> Path:
    models.mkdir()
    (models / "t.gguf").write_bytes(gguf.read_bytes())
    write_model_yaml(models, MODEL, backend="llama-cpp", context_size=1024, parameters={"model": "t.gguf"})
    # the model's own stop word ends a turn: end_turn, not stop_sequence (the request did not ask for it)
    write_model_yaml(models, "tiny-stopword", backend="llama-cpp", context_size=1024,
                     parameters={"model": "t.gguf"}, stopwords=["!"])
    return models


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):  # noqa: ANN201
    root = tmp_path_factory.mktemp("messages")
    models = write_models(root / "models", tiny_gguf)
    process = ServerProcess(["--models-path", str(models), "--config-dir", str(root / "data"), "--threads", "1"],
                            cwd=root)
    process.start(root / "server.log")
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def claude(server: ServerProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120) as api:
        yield api  # closed: a pooled connection left to the garbage collector fails a later test


@pytest.fixture
async def client(make_client, tmp_path: Path, tiny_gguf: Path):  # noqa: ANN001, ANN201
    models = write_models(tmp_path / "models", tiny_gguf)
    return await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                            api_keys=("k",)))


AUTH = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


def sse(raw: str) -> list[tuple[str, dict]]:
    """Anthropic's framing: every event is ``event: <type>`` then ``data: <json>`` naming the same type."""
    assert raw.endswith("\n\n") and "[DONE]" not in raw
    events = []
    for block in raw.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        name, data = name_line[len("event: "):], json.loads(data_line[len("data: "):])
        assert data["type"] == name
        events.append((name, data))
    return events


def anthropic_error(body: dict, kind: str) -> str:
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    return body["error"]["message"]


def blocks(message: anthropic.types.Message) -> list[dict]:
    return [block.model_dump(exclude_none=True) for block in message.content]


# -- the official client against a real server -----------------------------------------------------------

def test_create_answer_shape_and_usage(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=5, messages=HI, **GREEDY)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODEL
    assert blocks(message) == [{"type": "text", "text": " Hello world! Hello world"}]
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 5
    assert message.usage.input_tokens == HI_PROMPT_TOKENS
    count = claude.messages.count_tokens(model=MODEL, messages=HI)
    assert count.input_tokens == message.usage.input_tokens


def test_system_prompt_as_string_or_blocks(claude: anthropic.Anthropic) -> None:
    plain = claude.messages.count_tokens(model=MODEL, messages=HI).input_tokens
    as_string = claude.messages.count_tokens(model=MODEL, messages=HI, system="Be brief.").input_tokens
    as_blocks = claude.messages.count_tokens(model=MODEL, messages=HI,
                                             system=[{"type": "text", "text": "Be brief."}]).input_tokens
    assert as_string == as_blocks > plain
    message = claude.messages.create(model=MODEL, max_tokens=2, messages=HI, system="Be brief.", **GREEDY)
    assert message.usage.input_tokens == as_string
    assert blocks(message) == [{"type": "text", "text": " Hello world"}]


def test_stream_equals_create(claude: anthropic.Anthropic) -> None:
    request = {"model": MODEL, "max_tokens": 7, "messages": HI,
               "extra_body": {"temperature": 0, "top_p": 1, "top_k": 40}}
    plain = claude.messages.create(**request)
    with claude.messages.stream(**request) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == " Hello world! Hello world! Hello"
    assert blocks(final) == blocks(plain) == [{"type": "text", "text": text}]
    assert (final.stop_reason, final.stop_sequence) == (plain.stop_reason, plain.stop_sequence) == ("max_tokens", None)
    assert final.usage.input_tokens == plain.usage.input_tokens == HI_PROMPT_TOKENS
    assert final.usage.output_tokens == plain.usage.output_tokens == 7
    assert final.id.startswith("msg_") and final.id != plain.id
    with claude.messages.create(**request, stream=True) as raw:  # the SDK hides only the ping
        kinds = [event.type for event in raw]
    assert kinds[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}


def test_tool_round_trip(claude: anthropic.Anthropic) -> None:
    request = {"model": MODEL, "max_tokens": 300, "messages": ASK, "tools": [WEATHER], **GREEDY}
    message = claude.messages.create(**request, tool_choice={"type": "any"})
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls and len(calls) == len(message.content)  # the call's JSON never shows up as text
    for call in calls:
        assert call.id.startswith("toolu_") and call.name == "get_weather"
        jsonschema.validate(call.input, WEATHER_SCHEMA)
    with claude.messages.stream(**request, tool_choice={"type": "any"}) as stream:
        streamed = stream.get_final_message()
    assert [(b.type, b.name, b.input) for b in streamed.content] == [(b.type, b.name, b.input) for b in calls]
    assert streamed.stop_reason == "tool_use"
    # the result goes back; the model answers in text
    history = [*ASK, {"role": "assistant", "content": [c.model_dump(exclude_none=True) for c in message.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": c.id,
                                             "content": [{"type": "text", "text": "Sunny, 22 C"}]} for c in calls]}]
    answer = claude.messages.create(**{**request, "max_tokens": 5, "messages": history}, tool_choice={"type": "none"})
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text
    counted = claude.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER], tool_choice={"type": "none"})
    # with tool_choice none the tools stay out of the prompt; the earlier call and its result are in it
    bare = claude.messages.count_tokens(model=MODEL, messages=ASK).input_tokens
    assert answer.usage.input_tokens == counted.input_tokens > bare


def test_named_tool_and_tools_in_the_count(claude: anthropic.Anthropic) -> None:
    other = {"name": "get_time", "input_schema": {"type": "object", "properties": {
        "zone": {"type": "string", "enum": ["utc", "local"]}}, "required": ["zone"]}}
    message = claude.messages.create(model=MODEL, max_tokens=200, messages=ASK, tools=[WEATHER, other],
                                     tool_choice={"type": "tool", "name": "get_time"}, **GREEDY)
    assert message.stop_reason == "tool_use"
    assert [b.name for b in message.content] == ["get_time"]
    assert message.content[0].input["zone"] in ("utc", "local")
    bare = claude.messages.count_tokens(model=MODEL, messages=ASK).input_tokens
    with_tools = claude.messages.count_tokens(model=MODEL, messages=ASK, tools=[WEATHER, other],
                                              tool_choice={"type": "tool", "name": "get_time"}).input_tokens
    assert with_tools == message.usage.input_tokens > bare


def test_stop_sequence_is_reported(claude: anthropic.Anthropic) -> None:
    request = {"model": MODEL, "max_tokens": 20, "messages": HI, "stop_sequences": ["nothing", "world!"], **GREEDY}
    message = claude.messages.create(**request)
    assert blocks(message) == [{"type": "text", "text": " Hello "}]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "world!")
    with claude.messages.stream(**request) as stream:
        final = stream.get_final_message()
    assert blocks(final) == blocks(message)
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "world!")
    # the model's own stop word ends the turn: not a stop sequence of the request
    ended = claude.messages.create(**{**request, "model": "tiny-stopword", "stop_sequences": ["nothing"]})
    assert blocks(ended) == [{"type": "text", "text": " Hello world"}]
    assert (ended.stop_reason, ended.stop_sequence) == ("end_turn", None)


def test_bad_requests_in_anthropics_error_shape(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    import urllib.error
    import urllib.request

    raw = urllib.request.Request(server.url + "/v1/messages",
                                 data=json.dumps({"model": MODEL, "messages": HI}).encode(),  # no max_tokens
                                 headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(raw, timeout=30)
    assert refused.value.code == 400
    assert "max_tokens" in anthropic_error(json.loads(refused.value.read()), "invalid_request_error")
    bad = [
        ({"messages": [{"role": "user", "content": [{"type": "banana", "text": "x"}]}]}, "messages.0.content.0.type"),
        ({"messages": HI, "tools": [WEATHER], "tool_choice": {"type": "banana"}}, "tool_choice.type"),
        ({"messages": HI, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"messages": HI, "extra_body": {"temperature": 1.5}}, "temperature"),  # Anthropic's range is 0..1
    ]
    for fields, where in bad:
        with pytest.raises(anthropic.BadRequestError) as caught:
            claude.messages.create(model=MODEL, max_tokens=5, **fields)  # type: ignore[call-overload]
        assert caught.value.status_code == 400
        assert where in anthropic_error(caught.value.body, "invalid_request_error"), fields
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude.messages.create(model="no-such-model", max_tokens=5, messages=HI)
    assert "no-such-model" in anthropic_error(caught.value.body, "not_found_error")
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="no-such-model", messages=HI)
    # and it keeps serving
    assert claude.messages.create(model=MODEL, max_tokens=2, messages=HI, **GREEDY).content[0].text == " Hello world"


# -- the wire, with aiohttp's test client ------------------------------------------------------------------

async def test_stream_events_on_the_wire(client) -> None:  # noqa: ANN001
    resp = await client.post("/v1/messages", headers=AUTH,
                             json={"model": MODEL, "max_tokens": 3, "messages": HI, "temperature": 0, "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    events = sse(await resp.text())
    assert [name for name, _ in events] == STREAM_ORDER[:4] + ["content_block_delta"] * 2 + STREAM_ORDER[4:]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == HI_PROMPT_TOKENS and start["usage"]["output_tokens"] == 0
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [d["delta"] for n, d in events if n == "content_block_delta"] == [
        {"type": "text_delta", "text": t} for t in (" Hello", " world", "!")]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 3 and delta["usage"]["input_tokens"] == HI_PROMPT_TOKENS


async def test_tool_use_stream_on_the_wire(client) -> None:  # noqa: ANN001
    resp = await client.post("/v1/messages", headers=AUTH, json={
        "model": MODEL, "max_tokens": 300, "messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "any"},
        "temperature": 0, "stream": True})
    events = sse(await resp.text())
    starts = [d for n, d in events if n == "content_block_start"]
    assert starts and all(s["content_block"]["type"] == "tool_use" and s["content_block"]["input"] == {}
                          and s["content_block"]["id"].startswith("toolu_") for s in starts)
    arguments: dict[int, str] = {}
    for name, data in events:
        if name == "content_block_delta":
            assert data["delta"]["type"] == "input_json_delta"
            arguments[data["index"]] = arguments.get(data["index"], "") + data["delta"]["partial_json"]
    assert sorted(arguments) == [s["index"] for s in starts]
    for text in arguments.values():
        jsonschema.validate(json.loads(text), WEATHER_SCHEMA)
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_error_after_the_stream_started_is_an_error_event(client, monkeypatch) -> None:  # noqa: ANN001
    real = messages_api.turn_events

    async def failing(*args):  # noqa: ANN002, ANN202
        async with contextlib.aclosing(real(*args)) as events:
            yield await anext(events)  # Prepared
            yield await anext(events)  # the first text
        raise InternalError("the engine fell over")

    monkeypatch.setattr(messages_api, "turn_events", failing)
    resp = await client.post("/v1/messages", headers=AUTH,
                             json={"model": MODEL, "max_tokens": 5, "messages": HI, "stream": True})
    events = sse(await resp.text())
    assert [n for n, _ in events] == ["message_start", "ping", "content_block_start", "content_block_delta", "error"]
    assert anthropic_error(events[-1][1], "api_error") == "the engine fell over"


@pytest.mark.parametrize(("body", "where"), [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]}]},
     "assistant messages"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
     "user messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": HI, "system": [{"type": "image"}]}, "system.0.type"),
    ({"messages": HI, "tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"messages": HI, "tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]}, "nope"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "top_p": 2}, "top_p"),
])
async def test_invalid_requests(client, body: dict, where: str) -> None:  # noqa: ANN001
    resp = await client.post("/v1/messages", headers=AUTH, json={"model": MODEL, "max_tokens": 5, **body})
    assert resp.status == 400
    assert where in anthropic_error(await resp.json(), "invalid_request_error")


async def test_error_envelope_follows_the_route(client) -> None:  # noqa: ANN001
    resp = await client.post("/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": HI})
    assert resp.status == 401
    anthropic_error(await resp.json(), "authentication_error")
    resp = await client.post("/v1/messages/nothing", headers=AUTH, json={})
    assert resp.status == 404
    anthropic_error(await resp.json(), "not_found_error")
    resp = await client.get("/v1/messages", headers=AUTH)
    assert resp.status == 405
    anthropic_error(await resp.json(), "invalid_request_error")
    resp = await client.post("/v1/messages/count_tokens", headers=AUTH, json={"model": "nope", "messages": HI})
    assert resp.status == 404
    anthropic_error(await resp.json(), "not_found_error")
    # the OpenAI routes keep OpenAI's envelope
    resp = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "nope", "messages": HI})
    assert resp.status == 404
    assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}


async def test_count_tokens(client) -> None:  # noqa: ANN001
    resp = await client.post("/v1/messages/count_tokens", headers=AUTH, json={"model": MODEL, "messages": HI})
    assert resp.status == 200
    assert await resp.json() == {"input_tokens": HI_PROMPT_TOKENS}
    history = [*ASK, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
         "input": {"location": "Boston", "unit": "celsius"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny",
                                      "is_error": False}, {"type": "text", "text": "Thanks"}]}]
    resp = await client.post("/v1/messages/count_tokens", headers=AUTH,
                             json={"model": MODEL, "messages": history, "tools": [WEATHER]})
    assert resp.status == 200
    assert (await resp.json())["input_tokens"] > HI_PROMPT_TOKENS


async def test_documented_in_the_openapi_document(client) -> None:  # noqa: ANN001
    spec = await (await client.get("/swagger.json")).json()
    for path, answer in [("/v1/messages", "AnthropicMessage"), ("/v1/messages/count_tokens", "AnthropicTokenCount")]:
        operation = spec["paths"][path]["post"]
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(answer)
        assert operation["responses"]["default"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "AnthropicError")
        _, model = operation["requestBody"]["content"]["application/json"]["schema"]["allOf"]
        assert model["properties"]["model"]["enum"] == [MODEL, "tiny-stopword"]
    body = spec["components"]["schemas"]["anthropic.MessagesRequest"]
    assert sorted(body["required"]) == ["max_tokens", "messages", "model"]
    assert body["properties"]["temperature"] == {"type": "number", "minimum": 0, "maximum": 1}
