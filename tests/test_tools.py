"""Function calling and structured output on a tiny GGUF: random weights still give valid output under a grammar."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from conftest import DEFAULT_MODELS, default_model_configs, sse_events, write_model_yaml
from localai_aio.config import ServerSettings

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "What's the weather in Boston?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                                               "enum": ["utc", "local"]}},
                                       "required": ["zone"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture
async def tools_client(make_client, tmp_path: Path, tiny_gguf: Path):  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    (models / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "big", backend="llama-cpp", context_size=1024, parameters={"model": "t.gguf"})
    write_model_yaml(models, "big-ct", backend="ctransformers", context_size=1024, parameters={"model": "t.gguf"})
    write_model_yaml(models, "nogrammar", backend="llama-cpp", context_size=1024, parameters={"model": "t.gguf"},
                     function={"grammar": {"disable": True}})
    return await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))


def check_calls(message: dict) -> list[dict]:
    assert message["content"] is None
    calls = message["tool_calls"]
    assert calls
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    return calls


def reassemble(events: list) -> dict:
    """Rebuild tool calls from streamed deltas, checking OpenAI's delta rules on the way."""
    calls: dict[int, dict] = {}
    for event in events:
        delta = event["choices"][0]["delta"] if event["choices"] else {}
        assert not delta.get("content"), "tool JSON leaked into content"
        for part in delta.get("tool_calls", []):
            if part["index"] not in calls:
                assert set(part) == {"index", "id", "type", "function"} and part["function"]["arguments"] == ""
                calls[part["index"]] = {"id": part["id"], "type": part["type"],
                                        "function": {"name": part["function"]["name"], "arguments": ""}}
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
                calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    return calls


@pytest.mark.llama
async def test_required_tool_call_validates(tools_client) -> None:  # noqa: ANN001
    resp = await tools_client.post(CHAT, json={"model": "big", "messages": ASK, "tools": [WEATHER],
                                               "tool_choice": "required", "temperature": 0, "max_tokens": 300,
                                               "parallel_tool_calls": False})
    body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    calls = check_calls(body["choices"][0]["message"])
    assert [c["function"]["name"] for c in calls] == ["get_current_weather"]


@pytest.mark.llama
async def test_named_tool(tools_client) -> None:  # noqa: ANN001
    body = await (await tools_client.post(CHAT, json={
        "model": "big", "messages": ASK, "tools": [WEATHER, TIME], "temperature": 0, "max_tokens": 300,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}})).json()
    calls = check_calls(body["choices"][0]["message"])
    assert [c["function"]["name"] for c in calls] == ["get_time"]


@pytest.mark.llama
async def test_parallel_tool_calls_with_two_tools(tools_client) -> None:  # noqa: ANN001
    body = await (await tools_client.post(CHAT, json={
        "model": "big", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required",
        "parallel_tool_calls": True, "temperature": 0, "max_tokens": 400})).json()
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    calls = check_calls(body["choices"][0]["message"])
    assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.llama
async def test_streamed_tool_call_equals_plain(tools_client) -> None:  # noqa: ANN001
    request = {"model": "big", "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
               "temperature": 0, "max_tokens": 300, "parallel_tool_calls": False}
    plain = await (await tools_client.post(CHAT, json=request)).json()
    events = await sse_events(await tools_client.post(CHAT, json={**request, "stream": True}))
    streamed = reassemble(events)
    expected = plain["choices"][0]["message"]["tool_calls"]
    assert [c["function"] for c in streamed.values()] == [c["function"] for c in expected]
    reasons = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert reasons.count("tool_calls") == 1 and reasons[-1] == "tool_calls"


@pytest.mark.llama
async def test_auto_never_leaks_tool_json_into_content(tools_client) -> None:  # noqa: ANN001
    body = await (await tools_client.post(CHAT, json={"model": "big", "messages": ASK, "tools": [WEATHER],
                                                      "temperature": 0, "max_tokens": 300})).json()
    message = body["choices"][0]["message"]
    if message.get("tool_calls"):
        check_calls(message)
        assert body["choices"][0]["finish_reason"] == "tool_calls"
    else:
        assert not message["content"].lstrip().startswith(("{", "["))


@pytest.mark.llama
async def test_tool_choice_none_is_plain_text(tools_client) -> None:  # noqa: ANN001
    body = await (await tools_client.post(CHAT, json={"model": "big", "messages": [{"role": "user", "content": "hi"}],
                                                      "tools": [WEATHER], "tool_choice": "none",
                                                      "temperature": 0, "max_tokens": 3})).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": " Hello world!"}


@pytest.mark.llama
async def test_legacy_functions(tools_client) -> None:  # noqa: ANN001
    request = {"model": "big", "messages": ASK, "functions": [TIME["function"]],
               "function_call": {"name": "get_time"}, "temperature": 0, "max_tokens": 300}
    body = await (await tools_client.post(CHAT, json=request)).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "function_call"
    call = choice["message"]["function_call"]
    assert call["name"] == "get_time"
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["get_time"])
    events = await sse_events(await tools_client.post(CHAT, json={**request, "stream": True}))
    deltas = [e["choices"][0]["delta"] for e in events]
    parts = [d["function_call"] for d in deltas if "function_call" in d]
    assert parts[0] == {"name": "get_time", "arguments": ""}
    assert "".join(p["arguments"] for p in parts) == call["arguments"]


@pytest.mark.llama
async def test_tool_results_go_through_the_template(tools_client) -> None:  # noqa: ANN001
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_current_weather", "arguments": '{"location": "Boston", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees"}]
    resp = await tools_client.post(CHAT, json={"model": "big", "messages": messages, "tools": [WEATHER],
                                               "tool_choice": "none", "max_tokens": 2, "temperature": 0})
    assert resp.status == 200
    shorter = await tools_client.post(CHAT, json={"model": "big", "messages": ASK, "tool_choice": "none",
                                                  "tools": [WEATHER], "max_tokens": 1})
    assert (await resp.json())["usage"]["prompt_tokens"] > (await shorter.json())["usage"]["prompt_tokens"] + 20


@pytest.mark.llama
async def test_json_schema_output_validates(tools_client) -> None:  # noqa: ANN001
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["ok", "n"]}
    body = await (await tools_client.post(CHAT, json={
        "model": "big", "messages": ASK, "temperature": 0, "max_tokens": 100,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}}
    })).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), schema)


@pytest.mark.llama
async def test_gbnf_grammar_yes_or_no(tools_client) -> None:  # noqa: ANN001
    for temperature in (0, 1.5):
        body = await (await tools_client.post(CHAT, json={"model": "big", "messages": ASK, "temperature": temperature,
                                                          "grammar": 'root ::= "yes" | "no"'})).json()
        assert body["choices"][0]["message"]["content"] in {"yes", "no"}


@pytest.mark.llama
async def test_grammar_json_functions(tools_client) -> None:  # noqa: ANN001
    structure = {"oneOf": [{"type": "object", "properties": {
        "name": {"const": "get_time"}, "arguments": SCHEMAS["get_time"]}, "required": ["name", "arguments"]}]}
    body = await (await tools_client.post(CHAT, json={"model": "big", "messages": ASK, "temperature": 0,
                                                      "max_tokens": 100, "grammar_json_functions": structure})).json()
    calls = check_calls(body["choices"][0]["message"])
    assert calls[0]["function"]["name"] == "get_time"


@pytest.mark.llama
@pytest.mark.parametrize(("extra", "param", "fragment"), [
    ({"grammar": "root ::= [a-"}, "grammar", "Invalid grammar: unexpected end of input"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema", "is not valid"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
    # a schema no value satisfies
    ({"grammar_json_functions": {"type": "object", "required": ["a"],
                                 "properties": {"a": {"type": "string", "minLength": 3, "maxLength": 1}}}},
     "grammar_json_functions", "unsatisfiable"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "no tool named 'nope'"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0", "needs a 'name'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools.0.parameters", "Invalid JSON schema"),
])
async def test_invalid_constraints_are_400(tools_client, extra: dict, param: str, fragment: str) -> None:  # noqa: ANN001
    resp = await tools_client.post(CHAT, json={"model": "big", "messages": ASK, **extra})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == param and fragment in err["message"]
    assert (await tools_client.get("/healthz")).status == 200


@pytest.mark.llama
async def test_a_schema_of_unknown_keywords_allows_any_json(tools_client) -> None:  # noqa: ANN001
    """Keywords JSON Schema does not define constrain nothing (they used to fail the grammar converter: a 500)."""
    resp = await tools_client.post(CHAT, json={"model": "big", "messages": ASK, "temperature": 0, "max_tokens": 60,
                                               "response_format": {"type": "json_schema", "json_schema": {
                                                   "name": "x", "schema": {"": 1.5, "x": {"y": []}}}}})
    assert resp.status == 200
    choice = (await resp.json())["choices"][0]
    content = choice["message"]["content"]
    if choice["finish_reason"] == "stop":
        json.loads(content)
    else:  # the tiny model writes a long value: what came is the start of one
        assert choice["finish_reason"] == "length" and content[:1] in set('{["-0123456789tfn')


@pytest.mark.ctransformers
@pytest.mark.parametrize("extra", [{"tools": [WEATHER]}, {"response_format": {"type": "json_object"}},
                                   {"grammar": 'root ::= "yes"'}])
async def test_ctransformers_refuses_constraints(tools_client, extra: dict) -> None:  # noqa: ANN001
    resp = await tools_client.post(CHAT, json={"model": "big-ct", "messages": ASK, **extra})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["code"] == "unsupported_for_model" and "ctransformers" in err["message"]
    ok = await tools_client.post(CHAT, json={"model": "big-ct", "messages": ASK, "max_tokens": 1})
    assert ok.status == 200


@pytest.mark.llama
async def test_yaml_can_disable_the_tool_grammar(tools_client) -> None:  # noqa: ANN001
    body = await (await tools_client.post(CHAT, json={"model": "nogrammar", "messages": ASK, "tools": [WEATHER],
                                                      "tool_choice": "required", "temperature": 0,
                                                      "max_tokens": 3})).json()
    # Unconstrained, the tiny model just talks; nothing is parsed into a call.
    assert body["choices"][0]["message"] == {"role": "assistant", "content": " Hello world!"}


# -- the real default model ------------------------------------------------------------------------------------

@pytest.mark.model
@pytest.mark.llama
async def test_real_model_calls_weather_for_boston(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    configs = default_model_configs("smollm2-135m-instruct")
    client = await make_client(ServerSettings(models_path=str(DEFAULT_MODELS), config_dir=str(tmp_path / "d")),
                               model_configs=configs)
    weather = {"type": "function", "function": {
        "name": "get_current_weather", "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "The city, e.g. San Francisco"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location", "unit"]}}}
    body = await (await client.post(CHAT, json={"model": "smollm2-135m-instruct", "messages": ASK,
                                                "tools": [weather], "tool_choice": "required", "temperature": 0,
                                                "parallel_tool_calls": False, "max_tokens": 200})).json()
    calls = body["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_current_weather"
    arguments = json.loads(calls[0]["function"]["arguments"])
    assert "Boston" in arguments["location"]
    body = await (await client.post(CHAT, json={
        "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 200,
        "messages": [{"role": "user", "content": "Return a JSON object with the keys name and age for a cat "
                                                 "named Tom who is 3."}],
        "response_format": {"type": "json_object"}})).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert json.loads(body["choices"][0]["message"]["content"]) == {"name": "Tom", "age": 3}


@pytest.mark.llama
async def test_yaml_parallel_calls_and_mixed_mode(make_client, tmp_path: Path, tiny_gguf: Path) -> None:  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    (models / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "single", context_size=1024, parameters={"model": "t.gguf"},
                     function={"grammar": {"parallel_calls": False}})
    write_model_yaml(models, "nomixed", context_size=1024, parameters={"model": "t.gguf"},
                     function={"grammar": {"mixed_mode": False}})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    from localai_aio.text.tool_formats import GENERIC
    from localai_aio.text.tools import plan_tools

    # parallel_calls: false -> the grammar has no array branch, so exactly one call comes back
    request = {"tools": [WEATHER, TIME], "tool_choice": "required"}
    assert '"["' in plan_tools(request, {}).constraint(GENERIC)[0]
    assert '"["' not in plan_tools(request, {"grammar": {"parallel_calls": False}}).constraint(GENERIC)[0]
    body = await (await client.post(CHAT, json={"model": "single", "messages": ASK, "tools": [WEATHER, TIME],
                                                "tool_choice": "required", "temperature": 0,
                                                "max_tokens": 300})).json()
    assert len(check_calls(body["choices"][0]["message"])) == 1
    # mixed_mode: false -> "auto" runs without a grammar: the tiny model just talks
    body = await (await client.post(CHAT, json={"model": "nomixed", "messages": [{"role": "user", "content": "hi"}],
                                                "tools": [WEATHER], "temperature": 0, "max_tokens": 3})).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": " Hello world!"}
