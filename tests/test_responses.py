"""OpenAI's Responses API on the tiny GGUF: the official client against a real server process, stored
conversations across a restart, background responses, and errors."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jsonschema
import openai
import pytest

from conftest import write_model_yaml

pytestmark = pytest.mark.llama
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "unit": {"type": "string", "enum": ["c", "f"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}


@pytest.fixture
def models(tmp_path: Path, tiny_gguf: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(folder, "tiny", context_size=2048, parameters={"model": "tiny.gguf"})
    # room for a generation that lasts seconds, so that a background response is still running when asked
    write_model_yaml(folder, "long", context_size=16384, parameters={"model": "tiny.gguf"})
    return folder


@pytest.fixture
def serve(server_process, models: Path, tmp_path: Path):  # noqa: ANN001, ANN201
    """Start a server on the same data directory each time (a restart keeps what was stored)."""
    clients: list[openai.OpenAI] = []

    def start():  # noqa: ANN202
        server = server_process("--models-path", str(models), "--config-dir", str(tmp_path / "data"),
                                "--threads", "1")
        clients.append(openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0))
        return server, clients[-1]

    yield start
    for client in clients:  # a pooled connection left to the garbage collector fails a later test
        client.close()


def test_create_retrieve_list_delete(serve) -> None:  # noqa: ANN001
    _, client = serve()
    response = client.responses.create(model="tiny", input="Hello there", max_output_tokens=12, temperature=0,
                                       instructions="Be brief.", metadata={"topic": "greeting"})
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert message.content[0].type == "output_text" and response.output_text == message.content[0].text != ""
    usage = response.usage
    assert usage.output_tokens == 12 and usage.total_tokens == usage.input_tokens + 12
    assert usage.input_tokens_details.cached_tokens >= 0
    assert response.metadata == {"topic": "greeting"} and response.instructions == "Be brief."
    stored = client.responses.retrieve(response.id)
    assert stored.model_dump() == response.model_dump()
    items = client.responses.input_items.list(response.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "Hello there")]
    deleted = client.responses.delete(response.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def _same(streamed: dict, plain: dict) -> None:
    """Two responses to the same request: equal but for their ids, times and the prompt-cache hit (the
    second one finds the first one's prompt cached)."""
    def strip(response: dict) -> dict:
        usage = {**response["usage"], "input_tokens_details": None}
        output = [{**item, "id": None, **({"content": [{k: v for k, v in part.items() if k != "parsed"}
                                                      for part in item["content"]]} if "content" in item else {})}
                  for item in response["output"]]  # "parsed": what the client's stream helper adds
        return {**response, "id": None, "created_at": None, "usage": usage, "output": output}

    assert strip(streamed) == strip(plain)


def test_stream_events_rebuild_the_response(serve) -> None:  # noqa: ANN001
    _, client = serve()
    ask = {"model": "tiny", "input": "Tell me a story", "max_output_tokens": 20, "temperature": 0, "store": False}
    plain = client.responses.create(**ask)
    events = list(client.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # OpenAI's last event when max_output_tokens cut the answer
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[2].item.content == [] and events[3].part.text == ""  # as they were when sent
    _same(events[-1].response.model_dump(), plain.model_dump())


def test_stream_helper_gets_the_final_response(serve) -> None:  # noqa: ANN001
    _, client = serve()
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    ask = {"model": "tiny", "input": "A number", "max_output_tokens": 60, "temperature": 0, "store": False,
           "text": {"format": {"type": "json_schema", "name": "n", "schema": schema, "strict": True}}}
    plain = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and final.status == "completed"
    assert final.output_text == plain.output_text and json.loads(final.output_text)["n"] in range(10)
    _same(final.model_dump(exclude={"output_parsed"}), plain.model_dump())


def test_function_call_round_trip(serve) -> None:  # noqa: ANN001
    _, client = serve()
    first = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                    temperature=0, max_output_tokens=200)
    assert first.status == "completed"
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and all(c.name == "get_weather" and c.call_id for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": '{"temperature": 21}'}
               for c in calls]
    second = client.responses.create(model="tiny", previous_response_id=first.id, input=outputs, tools=[WEATHER],
                                      max_output_tokens=60, temperature=0)
    assert second.output and {item.type for item in second.output} <= {"message", "function_call"}
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the whole conversation was the prompt
    assert second.usage.input_tokens_details.cached_tokens > 0  # ...and its start came from the prompt cache


def test_streamed_function_call(serve) -> None:  # noqa: ANN001
    _, client = serve()
    with client.responses.stream(model="tiny", input="Weather?", tools=[WEATHER], tool_choice="required",
                                 temperature=0, max_output_tokens=200, store=False) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    calls = [item for item in final.output if item.type == "function_call"]
    assert done and done[0].arguments == calls[0].arguments and deltas.startswith(calls[0].arguments)
    assert events[-1].type == "response.completed"


def test_json_schema_output(serve) -> None:  # noqa: ANN001
    _, client = serve()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    response = client.responses.create(model="tiny", input="Answer", temperature=0, max_output_tokens=100,
                                       text={"format": {"type": "json_schema", "name": "r", "schema": schema,
                                                        "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)


def test_conversation_survives_a_restart(serve) -> None:  # noqa: ANN001
    server, client = serve()
    first = client.responses.create(model="tiny", input="My name is Ada.", max_output_tokens=6, temperature=0)
    assert server.stop() == 0
    _, client = serve()
    second = client.responses.create(model="tiny", input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    assert second.status in ("completed", "incomplete") and second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = client.responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["What is my name?"]
    assert client.responses.retrieve(first.id).output_text == first.output_text


def test_background_response_is_cancelled(serve) -> None:  # noqa: ANN001
    _, client = serve()
    started = client.responses.create(model="long", input="Go on and on", background=True,
                                       max_output_tokens=16000, temperature=1)
    assert started.status in ("queued", "in_progress") and started.background is True
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(started.id).status == "cancelled"
    done = client.responses.create(model="tiny", input="Short", background=True, max_output_tokens=4)
    for _ in range(200):
        polled = client.responses.retrieve(done.id)
        if polled.status not in ("queued", "in_progress"):
            break
        time.sleep(0.05)
    assert polled.status == "incomplete" and polled.usage.output_tokens == 4 and polled.output_text


def test_a_restart_fails_an_interrupted_background_response(serve) -> None:  # noqa: ANN001
    server, client = serve()
    started = client.responses.create(model="long", input="Go on and on", background=True,
                                       max_output_tokens=16000, temperature=1)
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGKILL)  # a crash: nothing gets to mark the response
    server.proc.wait()
    _, client = serve()
    after = client.responses.retrieve(started.id)
    assert after.status == "failed" and "restarted" in after.error.message


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"input": [{"type": "image_generation_call"}]}, "input.0.type", "image_generation_call"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0.type", "web_search"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role", "one of"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type", "json_schema"),
    ({"input": "hi", "background": True, "store": False}, "background", "stored"),
    ({}, "input", "required"),
])
async def test_bad_input_is_400(make_client, models: Path, tmp_path: Path, body: dict, param: str,
                                fragment: str) -> None:
    from localai_aio.config import ServerSettings

    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    resp = await client.post("/v1/responses", json={"model": "tiny", **body})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and fragment in error["message"]


async def test_unknown_ids_are_404(make_client, models: Path, tmp_path: Path) -> None:
    from localai_aio.config import ServerSettings

    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    for method, path in [("GET", "/v1/responses/resp_x"), ("DELETE", "/v1/responses/resp_x"),
                         ("GET", "/v1/responses/resp_x/input_items"), ("POST", "/v1/responses/resp_x/cancel")]:
        resp = await client.request(method, path)
        assert resp.status == 404, path
        assert (await resp.json())["error"]["message"] == "No response found with id 'resp_x'"
    resp = await client.post("/v1/responses", json={"model": "tiny", "input": "hi", "previous_response_id": "resp_x"})
    assert resp.status == 404 and (await resp.json())["error"]["param"] == "previous_response_id"


async def test_truncation_auto_drops_the_oldest_turns(make_client, tiny_gguf: Path, tmp_path: Path) -> None:
    from localai_aio.config import ServerSettings

    models = tmp_path / "small"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "small", context_size=512, parameters={"model": "tiny.gguf"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    long = "hello world " * 40
    first = await (await client.post("/v1/responses", json={"model": "small", "input": long,
                                                            "max_output_tokens": 4})).json()
    assert 256 < first["usage"]["input_tokens"] < 512, first
    ask = {"model": "small", "input": long, "previous_response_id": first["id"], "max_output_tokens": 4}
    refused = await client.post("/v1/responses", json=ask)  # both turns do not fit
    assert refused.status == 400 and (await refused.json())["error"]["code"] == "context_length_exceeded"
    fitted = await client.post("/v1/responses", json={**ask, "truncation": "auto"})
    body = await fitted.json()
    assert fitted.status == 200 and body["truncation"] == "auto"
    # cut from its start until it fits: the first question, then its answer, leaving the new input alone
    assert body["usage"]["input_tokens"] == first["usage"]["input_tokens"]
