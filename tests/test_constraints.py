"""No constraint can end the process: grammars, schemas and tool definitions no answer can satisfy, sent
through every door (chat, completions, tools, Responses, Anthropic Messages; streamed or not; n > 1)
to a real server process, fail their own request with a clear error while the server keeps serving.

Two kinds of failure: a constraint refused before generation (it does not compile: a surrogate in a
character class, a minimum above a maximum) is a 400 naming the field; a constraint that compiles but
that no token of the model's vocabulary can continue (the BPE test model has no digits) ends its request
when generation reaches that point, and llama.cpp's grammar sampler used to abort the process there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from conftest import ServerProcess, tiny_gguf_server, write_model_yaml
from tiny_models import write_tiny_gguf

pytestmark = pytest.mark.llama

HI = [{"role": "user", "content": "hi"}]
SURROGATE = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[\\uD800]$"}}, "required": ["a"]}
INVERTED = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 2}}, "required": ["n"]}
NUL_ONLY = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[\\x00]$"}}, "required": ["a"]}


def strict(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": schema}}


def tool(parameters: dict) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with tiny_gguf_server(tmp_path_factory.mktemp("constraints"), {
        "sp": {},  # SentencePiece with byte fallback: every text can be spelled
        "bpe": {"bpe": True},  # words and letters only: no digits, no punctuation
        "hermes": {"extra_tokens": {"<tool_call>": 4, "</tool_call>": 4}, "then": {"!": "<tool_call>"}},
    }) as proc:
        yield proc


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
    assert server.proc is not None and server.proc.poll() is None, server.log()  # the process is still there


def still_serving(http: httpx.Client) -> None:
    ok = http.post("/v1/chat/completions", json={"model": "sp", "messages": HI, "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["content"] == " Hello world!"


# -- refused before generation ------------------------------------------------------------------------------

BEFORE = {
    "chat json_schema surrogate": ("/v1/chat/completions", {"messages": HI, "response_format": strict(SURROGATE)},
                                   "response_format.json_schema.schema", "not a Unicode scalar value"),
    "chat json_schema inverted bounds": ("/v1/chat/completions", {"messages": HI, "response_format": strict(INVERTED)},
                                         "response_format.json_schema.schema", "unsatisfiable"),
    "chat gbnf surrogate": ("/v1/chat/completions", {"messages": HI, "grammar": 'root ::= [\\uD800]'},
                            "grammar", "not a Unicode scalar value"),
    "completions gbnf surrogate": ("/v1/completions", {"prompt": "hi", "grammar": 'root ::= "a" [\\uD800-\\uDFFF]'},
                                   "grammar", "not a Unicode scalar value"),
    "completions json_object + bad schema": ("/v1/completions", {"prompt": "hi", "response_format": strict(INVERTED)},
                                             "response_format.json_schema.schema", "unsatisfiable"),
    "tools required": ("/v1/chat/completions", {"messages": HI, "tools": [tool(SURROGATE)], "tool_choice": "required"},
                       "tools", "not a Unicode scalar value"),
    "tools auto (lazy grammar)": ("/v1/chat/completions", {"messages": HI, "tools": [tool(INVERTED)]},
                                  "tools", "unsatisfiable"),
    "grammar_json_functions": ("/v1/chat/completions", {"messages": HI, "grammar_json_functions": INVERTED},
                               "grammar_json_functions", "unsatisfiable"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("door", BEFORE)
def test_a_constraint_that_cannot_compile_is_a_400_naming_its_field(http: httpx.Client, door: str,
                                                                    stream: bool) -> None:
    path, body, param, fragment = BEFORE[door]
    model = "hermes" if "lazy" in door else "sp"
    resp = http.post(path, json={"model": model, "max_tokens": 8, "n": 2, "stream": stream, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].startswith("Invalid grammar: ") and fragment in error["message"]
    still_serving(http)


def test_responses_text_format_that_cannot_compile(http: httpx.Client) -> None:
    for stream in (False, True):
        resp = http.post("/v1/responses", json={"model": "sp", "input": "hi", "stream": stream, "store": False,
                                                "text": {"format": {"type": "json_schema", "name": "x",
                                                                    "schema": INVERTED, "strict": True}}})
        assert resp.status_code == 400, resp.text
        assert "unsatisfiable" in resp.json()["error"]["message"]
    still_serving(http)


def test_anthropic_tools_that_cannot_compile(http: httpx.Client) -> None:
    for stream in (False, True):
        resp = http.post("/v1/messages", json={
            "model": "sp", "max_tokens": 8, "messages": HI, "stream": stream,
            "tools": [{"name": "f", "input_schema": SURROGATE}], "tool_choice": {"type": "any"}})
        assert resp.status_code == 400, resp.text
        body = resp.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert "not a Unicode scalar value" in body["error"]["message"]
    still_serving(http)


# -- no token can continue ----------------------------------------------------------------------------------

UNSATISFIABLE = {
    # the first token already has no candidate (this is where llama.cpp's sampler aborted the process)
    "grammar": ("/v1/completions", {"prompt": "hi", "grammar": 'root ::= "7"'}, "grammar"),
    "json_schema": ("/v1/chat/completions", {"messages": HI, "response_format": strict({"type": "integer"})},
                    "response_format.json_schema.schema"),
    "NUL-only pattern": ("/v1/chat/completions", {"messages": HI, "response_format": strict(NUL_ONLY)},
                         "response_format.json_schema.schema"),
    "tool call": ("/v1/chat/completions", {"messages": HI, "tool_choice": "required", "tools": [
        tool({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})]}, "tools"),
}


@pytest.mark.parametrize("door", UNSATISFIABLE)
def test_a_constraint_no_token_can_continue_fails_its_request_alone(http: httpx.Client, door: str) -> None:
    path, body, param = UNSATISFIABLE[door]
    resp = http.post(path, json={"model": "bpe", "max_tokens": 40, "n": 2, "temperature": 0, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "constraint_unsatisfiable" and error["param"] == param
    assert error["message"].startswith("The output constraint cannot be continued: ")
    still_serving(http)


def test_a_stream_whose_constraint_stops_midway_ends_with_an_error_event(http: httpx.Client) -> None:
    """" Hello" is in the vocabulary, "7" is not: the stream has begun when the grammar runs dry, so it
    ends with an error event (as every error after a stream started does)."""
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "bpe", "messages": HI, "max_tokens": 40, "stream": True, "temperature": 0,
            "grammar": 'root ::= (" Hello" | " world") "7"'}) as resp:
        assert resp.status_code == 200
        events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text == " Hello"
    assert chunks[-1] == {"error": {
        "message": "The output constraint cannot be continued: no token of this model's vocabulary can continue "
                   "the output",
        "type": "invalid_request_error", "param": "grammar", "code": "constraint_unsatisfiable"}}
    still_serving(http)


def test_the_nul_only_pattern_is_answered_escaped_where_the_vocabulary_can_spell_it(http: httpx.Client) -> None:
    """The issue's request: on a vocabulary with every byte, the only valid answer is written, escaped."""
    resp = http.post("/v1/chat/completions", json={"model": "sp", "messages": HI, "max_tokens": 40,
                                                   "response_format": strict(NUL_ONLY), "temperature": 0})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    value = json.loads(choice["message"]["content"])
    jsonschema.validate(value, NUL_ONLY)
    assert value == {"a": "\x00"}
    still_serving(http)


def test_constraints_keep_working_beside_a_failing_one(http: httpx.Client) -> None:
    """A grammar that runs dry on one slot leaves the other slot's constrained answer whole."""
    import concurrent.futures

    def good() -> httpx.Response:
        return http.post("/v1/chat/completions", json={
            "model": "bpe", "messages": HI, "max_tokens": 30, "temperature": 0,
            "grammar": 'root ::= (" Hello" | " world")+ "!"'})

    def bad() -> httpx.Response:
        return http.post("/v1/completions", json={"model": "bpe", "prompt": "hi",
                                                  "grammar": 'root ::= (" Hello" | " world") "7"'})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [pool.submit(f) for f in (good, bad, good, bad)]
        answers = [r.result() for r in results]
    assert [a.status_code for a in answers] == [200, 400, 200, 400]
    for answer in answers[::2]:
        text = answer.json()["choices"][0]["message"]["content"]
        assert text.endswith("!") or answer.json()["choices"][0]["finish_reason"] == "length"
        assert set(text.replace(" Hello", "").replace(" world", "").replace("!", "")) == set()


def test_compiled_grammars_are_kept(tmp_path: Path) -> None:
    """One compile per grammar text: a second check of the same grammar is a lookup."""
    from localai_aio.backends.llama_cpp import load
    from localai_aio.config import ServerSettings, load_model_configs
    from localai_aio.text.tools import schema_grammar

    write_tiny_gguf(tmp_path / "t.gguf")
    write_model_yaml(tmp_path, "t", backend="llama-cpp", context_size=256, parameters={"model": "t.gguf"})
    configs, _ = load_model_configs(tmp_path)
    engine = load(configs["t"], ServerSettings(models_path=str(tmp_path)))
    try:
        grammar = schema_grammar({"type": "object", "properties": {"a": {"type": "string"}}})
        calls = []
        original = engine.grammars._build
        engine.grammars._build = lambda text: calls.append(text) or original(text)
        assert engine.check_grammar(grammar) is None
        assert engine.check_grammar(grammar) is None
        first, second = engine.grammars.matcher(grammar), engine.grammars.matcher(grammar)
        assert calls == [grammar]
        assert first is not second  # each request gets its own matcher state
        assert "unsatisfiable" in (engine.check_grammar(schema_grammar(INVERTED)) or "")
    finally:
        engine.close()


DRY_MIDWAY = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}  # '{"a": ' then a digit


def test_responses_and_messages_streams_that_run_dry_end_with_their_error_event(http: httpx.Client) -> None:
    """The BPE model can write '{"a": ' but no digit: the stream has begun when the schema runs dry."""
    for path, body in (
        ("/v1/responses", {"input": "hi", "store": False, "text": {"format": {
            "type": "json_schema", "name": "x", "schema": DRY_MIDWAY, "strict": True}}}),
        ("/v1/messages", {"max_tokens": 40, "messages": HI, "tool_choice": {"type": "any"},
                          "tools": [{"name": "f", "input_schema": DRY_MIDWAY}]}),
    ):
        with http.stream("POST", path, json={"model": "bpe", "stream": True, "temperature": 0, **body}) as resp:
            assert resp.status_code == 200
            lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
        last = json.loads(lines[-1][len("data: "):])
        if path == "/v1/responses":
            assert last["type"] in ("error", "response.failed"), last
            text = json.dumps(last)
        else:
            assert last["type"] == "error", last
            text = last["error"]["message"]
        assert "The output constraint cannot be continued" in text
    still_serving(http)
