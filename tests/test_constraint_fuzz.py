"""Random constraints against a real server process: hundreds of generated JSON schemas (with regex
patterns, formats, bounds that may contradict each other, nesting, unions), random regexes and random
GBNF grammars (escapes up to U+10FFFF, surrogates, NULs, negated classes, undefined and recursive rules)
through the chat, completions, tools and Responses doors, streamed or not. Every answer is a 200 whose
text validates against its schema, or a 4xx in OpenAI's error shape (before or during the stream), and
the process survives them all. The examples are derandomized: CI runs the same ones every time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import ServerProcess, tiny_gguf_server

pytestmark = pytest.mark.llama

EXAMPLES = 300
TIMEOUT = 30  # seconds for one request: every one is small (32 tokens of a tiny model)
HI = [{"role": "user", "content": "hi"}]

# -- strategies ---------------------------------------------------------------------------------------------

REGEX_PIECES = ["a", "b", "[a-z]", "[^a]", "\\d", "\\w", ".", "*", "+", "?", "|", "(", ")", "{2,3}", "{0}", "^", "$",
                "\\x00", "\\u0000", "[\\x00-\\x1f]", "\\uFFFF", "[\\uD800-\\uDFFF]", "\\uD83D", "[^\\x00-\\uFFFF]",
                "(?i)", "(?!a)", "\\p{L}", "[", "]", "\\", "\\b", "é", "😀", "[😀-😂]"]
patterns = st.one_of(
    st.sampled_from(["^[\\x00]$", "^[\\uD800]$", "^$", "^a{300}$", "^(a|b)*c$", "^\\d{3}-\\d{2}$", "[^\\s\\S]",
                     "^[\\u0000-\\u001F]+$", "^.*$", "(?=a)a", "a**", "^[😀-😂]{1,3}$"]),
    st.lists(st.sampled_from(REGEX_PIECES), max_size=8).map("".join),
)
names = st.one_of(st.sampled_from(["a", "b", "name", "x y", "\u0000", "é", "\"q\"", "\\", ""]),
                  st.text(max_size=6))
small = st.integers(min_value=-20, max_value=20)


def strings() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"type": st.just("string")}, optional={
        "minLength": st.integers(0, 6), "maxLength": st.integers(0, 6), "pattern": patterns,
        "format": st.sampled_from(["email", "date", "date-time", "uuid", "ipv4", "no-such-format"]),
        "enum": st.lists(st.text(max_size=4), min_size=1, max_size=3)})


def numbers() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"type": st.sampled_from(["integer", "number"])}, optional={
        "minimum": small, "maximum": small, "exclusiveMinimum": small, "exclusiveMaximum": small,
        "multipleOf": st.sampled_from([1, 2, 0.5, 3])})


leaves = st.one_of(strings(), numbers(), st.just({"type": "boolean"}), st.just({"type": "null"}),
                   st.builds(lambda v: {"const": v}, st.one_of(st.none(), small, st.text(max_size=3))),
                   st.builds(lambda v: {"enum": v}, st.lists(st.one_of(small, st.text(max_size=3)), min_size=1,
                                                            max_size=3)),
                   st.just({"type": ["string", "null"], "maxLength": 2}), st.just({}))


def containers(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def obj(props: dict[str, Any], required: list[str], extra: bool | None) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object", "properties": props,
                                  "required": [r for r in required if r in props] + required[:1]}
        if extra is not None:
            schema["additionalProperties"] = extra
        return schema

    return st.one_of(
        st.builds(obj, st.dictionaries(names, children, max_size=3), st.lists(names, max_size=3),
                  st.one_of(st.none(), st.booleans())),
        st.builds(lambda items, lo, hi: {"type": "array", "items": items, "minItems": lo, "maxItems": hi},
                  children, st.integers(0, 3), st.integers(0, 3)),
        st.builds(lambda options: {"anyOf": options}, st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda options: {"allOf": options}, st.lists(children, min_size=1, max_size=2)),
    )


schemas = st.recursive(leaves, containers, max_leaves=6)

GBNF_LITERALS = ["a", " Hello", "7", "\\x00", "\\u0000", "\\U0010FFFF", "\\uD800", "\\n", "\\\"", "é", "\\t", "{"]
GBNF_CLASSES = ["[a-z]", "[^a]", "[\\x00-\\x1f]", "[^\\x00-\\U0010FFFF]", "[\\uE000-\\uF8FF]", "[\\uD800-\\uDFFF]",
                "[0-9]", "[ ]", "[^\\n]", "[\\U00010000-\\U0010FFFF]", "[z-a]"]


def gbnf_items(rules: list[str]) -> st.SearchStrategy[str]:
    atom = st.one_of(st.sampled_from(GBNF_LITERALS).map(lambda t: f'"{t}"'), st.sampled_from(GBNF_CLASSES),
                     st.sampled_from([*rules, "undefined-rule", "root"]))
    return st.recursive(
        atom,
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(" ".join),
            st.lists(inner, min_size=2, max_size=3).map(lambda a: "(" + " | ".join(a) + ")"),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "{0,3}", "{2}", "{5000}"])).map(
                lambda p: f"({p[0]}){p[1]}")),
        max_leaves=5)


@st.composite
def gbnf(draw: st.DrawFn) -> str:
    rules = [f"r{i}" for i in range(draw(st.integers(0, 2)))]
    lines = [f"root ::= {draw(gbnf_items(rules))}"] + [f"{rule} ::= {draw(gbnf_items(rules))}" for rule in rules]
    return "\n".join(lines)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """(path, body, the schema the answer must validate against, when there is one)."""
    door = draw(st.sampled_from(["chat-schema", "completions-gbnf", "chat-gbnf", "tools", "responses", "regex"]))
    common = {"model": draw(st.sampled_from(["sp", "bpe"])), "max_tokens": 32, "stream": draw(st.booleans()),
              "temperature": draw(st.sampled_from([0, 1.0])), "seed": draw(st.integers(0, 99))}
    if door in ("chat-schema", "responses"):
        schema = draw(schemas)
        if door == "responses":
            return "/v1/responses", {"model": common["model"], "input": "hi", "max_output_tokens": 32,
                                     "stream": common["stream"], "store": False, "temperature": common["temperature"],
                                     "text": {"format": {"type": "json_schema", "name": "x", "schema": schema,
                                                         "strict": True}}}, schema
        return "/v1/chat/completions", {**common, "messages": HI, "n": draw(st.integers(1, 2)), "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": schema}}}, schema
    if door == "regex":
        schema = {"type": "string", "pattern": draw(patterns)}
        return "/v1/chat/completions", {**common, "messages": HI, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, schema
    if door == "tools":
        parameters = draw(containers(leaves))
        return "/v1/chat/completions", {**common, "messages": HI, "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": parameters}}]}, None
    grammar = draw(gbnf())
    if door == "completions-gbnf":
        return "/v1/completions", {**common, "prompt": "hi", "grammar": grammar}, None
    return "/v1/chat/completions", {**common, "messages": HI, "grammar": grammar}, None


# -- the server ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with tiny_gguf_server(tmp_path_factory.mktemp("fuzz"), {
        "sp": {"logit_scale": 0.5},  # flat enough that sampling wanders
        "bpe": {"bpe": True},  # no digits or punctuation: many constraints run dry
    }) as proc:
        yield proc


def check_error(body: Any) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", body
    assert isinstance(error["message"], str) and error["message"]


def answer_texts(path: str, resp: httpx.Response, stream: bool) -> list[tuple[str, str | None]]:
    """(text, finish reason) of each choice, or [] when the request failed in its stream."""
    if not stream:
        body = resp.json()
        if path == "/v1/responses":
            text = "".join(part.get("text", "") for item in body["output"] if item["type"] == "message"
                           for part in item["content"])
            return [(text, "stop" if body["status"] == "completed" else "length")]
        return [(c.get("text") if path == "/v1/completions" else c["message"].get("content") or "",
                 c["finish_reason"]) for c in body["choices"]]
    events = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    if path == "/v1/responses":
        last = json.loads(events[-1])
        if last.get("type") in ("error", "response.failed"):
            return []
        done = next(json.loads(e) for e in events if json.loads(e).get("type") == "response.output_text.done")
        return [(done["text"], "stop" if last["type"] == "response.completed" else "length")]
    if events[-1] != "[DONE]":
        check_error(json.loads(events[-1]))
        return []
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    for data in events[:-1]:
        for choice in json.loads(data).get("choices", []):
            piece = choice.get("text") if path == "/v1/completions" else choice["delta"].get("content")
            texts.setdefault(choice["index"], []).append(piece or "")
            finish[choice["index"]] = choice.get("finish_reason") or finish.get(choice["index"])
    return [("".join(texts[i]), finish.get(i)) for i in sorted(texts)]


@given(requests())
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                  HealthCheck.data_too_large])
def test_no_constraint_ends_the_process(server: ServerProcess, request_: tuple) -> None:
    path, body, schema = request_
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        try:
            resp = http.post(path, json=body)
        except httpx.TimeoutException:
            raise AssertionError(f"no answer within {TIMEOUT} s to {path} {json.dumps(body)}") from None
    assert server.proc is not None and server.proc.poll() is None, server.log()[-3000:]
    event(f"{path} {'constrained' if schema is not None or 'grammar' in body or 'tools' in body else ''} "
          f"{resp.status_code}")
    if resp.status_code != 200:
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.text, body)
        if path == "/v1/responses":
            assert "error" in resp.json()
        else:
            check_error(resp.json())
        return
    for text, finish in answer_texts(path, resp, body.get("stream", False)):
        if schema is not None and finish == "stop":
            jsonschema.validate(json.loads(text), schema)



def test_the_server_still_answers_after_the_fuzz(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/healthz").status_code == 200
        ok = http.post("/v1/chat/completions", json={"model": "sp", "messages": HI, "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == " Hello world!"
