"""Native tool-call formats: the format is read from the chat template, the grammar is lazy where the
format has an opening marker, and the markup is parsed back into ``tool_calls``, never left in content.

The tiny models here carry each family's template and markers as tokens of their vocabulary; their
greedy successors are set so that the model writes some text and then opens a call, as a real
function-calling model does, and the grammar then holds it to a call of an offered tool.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from conftest import ServerProcess, write_model_yaml
from localai_aio.api.chat_jobs import _messages_for_template
from localai_aio.text.prompts import render_chat
from localai_aio.text.tool_formats import GENERIC, HERMES, LLAMA3, MISTRAL, CallSplitter, detect
from localai_aio.text.tools import plan_tools
from tiny_models import write_tiny_gguf

TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "local"]}},
                   "required": ["zone"], "additionalProperties": False}}}
HI = [{"role": "user", "content": "hi"}]

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: <tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> "
    "Call with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.tool_calls %}[TOOL_CALLS][{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}, \"id\": \"{{ c.id }}\"}{% endfor %}]{{ eos_token }}"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}"
    "<|end_header_id|>\n\n{% if m.tool_calls %}{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", "
    "\"parameters\": {{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "<|eot_id|>{% endfor %}{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nFunctions: "
    "{{ tools | tojson }}. Answer a call as {\"name\": ..., \"parameters\": ...}<|eot_id|>{% endif %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


# -- the formats, without a model ----------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "expected"), [
    (HERMES_TEMPLATE, HERMES), (MISTRAL_TEMPLATE, MISTRAL), (LLAMA3_TEMPLATE, LLAMA3),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", GENERIC),  # renders no tools: our own instructions
    ("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}", GENERIC),
])
def test_format_is_read_from_the_template(template: str, expected: object) -> None:
    assert detect(template) is expected


def test_hermes_parse_and_its_failures() -> None:
    text = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "local"}}</tool_call>')
    calls = HERMES.parse(text, frozenset({"get_time"}))
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"zone": "utc"}, {"zone": "local"}]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert HERMES.parse(text[:-12], frozenset({"get_time"})) is None  # the second call was cut short
    assert HERMES.parse(text, frozenset({"other"})) is None  # a tool nobody offered


def test_mistral_and_llama3_parse() -> None:
    [call] = MISTRAL.parse('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "utc"}}]')
    assert len(call["id"]) == 9 and call["id"].isalnum()  # what Mistral's templates accept back
    assert json.loads(call["function"]["arguments"]) == {"zone": "utc"}
    [call] = LLAMA3.parse('{"name": "get_time", "parameters": {"zone": "local"}}')
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "local"}'}


def test_streamed_text_holds_back_only_what_may_open_a_call() -> None:
    splitter = CallSplitter(HERMES)
    text = 'Let me look.<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    out = [splitter.feed(ch) for ch in text]
    assert "".join(out) == "Let me look."
    assert out[len("Let me look.") - 1] == "."  # the text went out as it came, up to the "<"
    assert splitter.finish() == ("", text[len("Let me look."):])
    plain = CallSplitter(HERMES)
    assert plain.feed("a < b and <tool") == "a < b and " and plain.finish() == ("<tool", None)


def test_grammars_lazy_for_markers_and_forced_when_required() -> None:
    plan = plan_tools({"tools": [TIME]}, {})
    grammar, trigger = plan.constraint(HERMES)
    assert trigger == "<tool_call>" and grammar.startswith("%llguidance {}\nstart: tool_after\n")
    required = plan_tools({"tools": [TIME], "tool_choice": "required"}, {})
    grammar, trigger = required.constraint(MISTRAL)
    assert trigger is None and grammar.startswith('%llguidance {}\nstart: "[TOOL_CALLS]" tool_after\n')
    grammar, trigger = plan.constraint(LLAMA3)
    assert trigger is None and '"required": ["name", "parameters"]' in grammar and "FREE_TEXT" in grammar


def test_earlier_calls_reach_native_templates_as_objects() -> None:
    """OpenAI sends arguments as a JSON string; templates that write them with ``tojson`` must get the
    object, or the model sees its own calls quoted twice."""
    messages = [{"role": "user", "content": "time?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_time", "arguments": '{"zone": "utc"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    plan = plan_tools({"tools": [TIME]}, {})
    prompt = render_chat(HERMES_TEMPLATE, _messages_for_template(messages, plan, HERMES_TEMPLATE),
                         bos_token="<s>", eos_token="</s>", tools=[TIME])
    assert '<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call>' in prompt
    assert "<tool_response>12:00</tool_response>" in prompt


# -- through a server, with the official client -----------------------------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    folder = tmp_path_factory.mktemp("formats")
    models = folder / "models"
    models.mkdir()
    markers = {"<tool_call>": 4, "</tool_call>": 4}
    # after " Hello world!" the model opens a call; once a call is closed it ends its turn
    write_tiny_gguf(models / "hermes.gguf", chat_template=HERMES_TEMPLATE, extra_tokens=markers,
                    then={"!": "<tool_call>", "</tool_call>": "</s>"})
    write_tiny_gguf(models / "hermes-talks.gguf", chat_template=HERMES_TEMPLATE, extra_tokens=markers)
    write_tiny_gguf(models / "mistral.gguf", chat_template=MISTRAL_TEMPLATE,
                    extra_tokens={"[TOOL_CALLS]": 3}, then={"<0x5D>": "[TOOL_CALLS]"})  # "]" ends "[/INST]"
    write_tiny_gguf(models / "llama3.gguf", chat_template=LLAMA3_TEMPLATE, then={"<0x0A>": "<0x7B>"})  # "\n" -> "{"
    write_tiny_gguf(models / "hermes-bytes.gguf", chat_template=HERMES_TEMPLATE)  # markers spelled in bytes
    for name in ("hermes", "hermes-talks", "mistral", "llama3", "hermes-bytes"):
        write_model_yaml(models, name, backend="llama-cpp", context_size=1024, parameters={"model": f"{name}.gguf"})
    server = ServerProcess(["--models-path", str(models), "--config-dir", str(folder / "data"), "--threads", "1"],
                           cwd=folder)
    server.start(folder / "server.log")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as api:
        yield api
    server.stop()


def ask(client: openai.OpenAI, model: str, **extra: object):  # noqa: ANN201
    request = {"model": model, "messages": HI, "tools": [TIME], "temperature": 0, "max_tokens": 120,
               "logprobs": True, **extra}
    return client.chat.completions.create(**request)


def raw_text(choice) -> str:  # noqa: ANN001
    """What the model wrote, token by token (the log-probabilities show every token)."""
    return "".join(t.token for t in choice.logprobs.content)


def check_time_call(call) -> None:  # noqa: ANN001
    assert call.type == "function" and call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


@pytest.mark.llama
def test_hermes_auto_text_then_call(client: openai.OpenAI) -> None:
    choice = ask(client, "hermes").choices[0]
    raw = raw_text(choice)
    assert raw.startswith(" Hello world!<tool_call>") and raw.rstrip().endswith("</tool_call>")
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == " Hello world!"  # the text before the call; no markup
    [call] = choice.message.tool_calls
    check_time_call(call)
    assert call.id.startswith("call_")


@pytest.mark.llama
def test_hermes_streamed_equals_plain(client: openai.OpenAI) -> None:
    plain = ask(client, "hermes").choices[0]
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model="hermes", messages=HI, tools=[TIME], temperature=0,
                                                max_tokens=120, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"name": part.function.name, "arguments": ""})
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert "<" not in content and content == plain.message.content
    assert finish == "tool_calls"
    assert list(calls.values()) == [{"name": "get_time", "arguments": plain.message.tool_calls[0].function.arguments}]


@pytest.mark.llama
def test_call_cut_by_max_tokens_leaves_no_markup(client: openai.OpenAI) -> None:
    choice = ask(client, "hermes", max_tokens=8).choices[0]
    assert "<tool_call>" in raw_text(choice)
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content == " Hello world!"


@pytest.mark.llama
def test_a_model_that_does_not_call_just_talks(client: openai.OpenAI) -> None:
    choice = ask(client, "hermes-talks", max_tokens=6).choices[0]
    assert choice.message.content == " Hello world! Hello world!" and choice.message.tool_calls is None
    assert choice.finish_reason == "length"


@pytest.mark.llama
def test_required_call_spelled_in_bytes(client: openai.OpenAI) -> None:
    """Markers that are not tokens of the vocabulary: the grammar spells them out from the first token."""
    choice = ask(client, "hermes-bytes", tool_choice="required", parallel_tool_calls=False, max_tokens=200).choices[0]
    assert raw_text(choice).startswith("<tool_call>")
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_time_call(choice.message.tool_calls[0])


@pytest.mark.llama
def test_mistral_calls_with_its_ids(client: openai.OpenAI) -> None:
    choice = ask(client, "mistral", max_tokens=200).choices[0]
    assert raw_text(choice).startswith("[TOOL_CALLS]")  # a control token, written out for the parser
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    check_time_call(call)
    assert len(call.id) == 9 and call.id.isalnum()
    # the call goes back through Mistral's template on the next turn
    follow = client.chat.completions.create(
        model="mistral", tools=[TIME], temperature=0, max_tokens=3, tool_choice="none",
        messages=[*HI, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "12:00"}])
    assert follow.choices[0].finish_reason in ("stop", "length")


@pytest.mark.llama
def test_llama3_calls_with_parameters(client: openai.OpenAI) -> None:
    choice = ask(client, "llama3").choices[0]
    raw = raw_text(choice)
    assert raw.lstrip().startswith("{") and '"parameters"' in raw
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_time_call(choice.message.tool_calls[0])


@pytest.mark.llama
def test_responses_api_gets_text_and_call_items(client: openai.OpenAI) -> None:
    tool = {"type": "function", **TIME["function"]}
    response = client.responses.create(model="hermes", input="hi", tools=[tool], temperature=0,
                                       max_output_tokens=120)
    kinds = [item.type for item in response.output]
    assert kinds == ["message", "function_call"]
    assert response.output_text == " Hello world!"
    assert response.output[1].name == "get_time"
    jsonschema.validate(json.loads(response.output[1].arguments), TIME["function"]["parameters"])
