"""Function calling and structured output: request fields -> a grammar, model text -> tool calls.

The output is constrained with a llama.cpp GBNF grammar built from JSON schemas, so a call the model
is required to make always parses and matches the tool's parameters:
- a tool call is the JSON object ``{"name": <tool>, "arguments": <its parameters>}`` (an array of them
  when parallel calls are allowed);
- ``tool_choice: "auto"`` uses a grammar with two branches: free text that does not start with ``{``
  or ``[``, or a call; the first character the model writes decides which one it is;
- ``response_format`` ``json_object`` / ``json_schema`` and LocalAI's ``grammar`` /
  ``grammar_json_functions`` constrain the whole answer.
Tool JSON never reaches ``content``: in call mode the text is parsed into ``tool_calls``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from localai_aio.errors import InvalidRequest, NotImplementedForModel

MAX_TOOLS = 128
FREE_TEXT_GBNF = r'''
text ::= [^{[ \t\n] [^\x00]*
'''


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks for, after validation."""

    grammar: str | None = None
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI tool definitions offered to the model (for the prompt)
    calls_expected: bool = False  # the output may (auto) or must (required) be parsed into tool calls
    required: bool = False
    legacy: bool = False  # `functions` / `function_call`: answer with `function_call`
    names: frozenset[str] = field(default_factory=frozenset)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def check_schema(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise InvalidRequest(f"Invalid value for '{param}': a JSON schema must be an object", param=param)
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(f"Invalid JSON schema in '{param}': {exc.message}", param=param) from None


def schema_to_gbnf(schema: Mapping[str, Any], param: str) -> str:
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError:
        raise NotImplementedForModel("Constrained output (tools, response_format, grammars) needs the llama-cpp "
                                     "engine: pip install 'localai-aio[llama]'", param=param) from None
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, ValueError, KeyError, TypeError, NotImplementedError, RecursionError) as exc:
        # the converter asserts on schemas it does not know, such as an object of unknown keywords
        raise InvalidRequest(f"Cannot turn the JSON schema in '{param}' into a grammar: {exc}", param=param) from None


def _function_of(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidRequest(f"Invalid value for '{where}': only tools of type 'function' are supported",
                             param=where)
    fn = tool.get("function", tool)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidRequest(f"Invalid value for '{where}': a function needs a 'name'", param=where)
    params = fn.get("parameters", {"type": "object", "properties": {}})
    check_schema(params, f"{where}.parameters")
    return {"name": fn["name"], "description": fn.get("description", ""), "parameters": params}


def _call_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    one = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"]} for f in functions]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    if not parallel:
        return call
    return {"anyOf": [call, {"type": "array", "items": call, "minItems": 1}]}


def _mixed(call_gbnf: str) -> str:
    """``root ::= call | text``: the call grammar's rules renamed under ``call``, plus free text."""
    renamed = call_gbnf.replace("root ::=", "call ::=", 1)
    return f"root ::= call | text\n{renamed}\n{FREE_TEXT_GBNF}"


def plan_tools(body: Mapping[str, Any], function_cfg: Mapping[str, Any]) -> ToolPlan:
    """Validate tools / functions / response_format / grammar fields and build the constraint."""
    legacy = body.get("functions") is not None and body.get("tools") is None
    raw_tools = body.get("tools") if not legacy else [{"type": "function", "function": f}
                                                       for f in body.get("functions") or []]
    choice = body.get("tool_choice") if not legacy else body.get("function_call")
    grammar_cfg = function_cfg.get("grammar") or {}
    grammar = body.get("grammar")
    if grammar is not None and not isinstance(grammar, str):
        raise InvalidRequest("Invalid value for 'grammar': must be a GBNF string", param="grammar")

    if raw_tools:
        where = "functions" if legacy else "tools"
        if not isinstance(raw_tools, list) or len(raw_tools) > MAX_TOOLS:
            raise InvalidRequest(f"Invalid value for '{where}': at most {MAX_TOOLS} tools", param=where)
        functions = [_function_of(t, f"{where}.{i}") for i, t in enumerate(raw_tools)]
        names = {f["name"] for f in functions}
        mode, chosen = _tool_choice(choice, names, legacy)
        if mode != "none":
            offered = tuple({"type": "function", "function": f} for f in functions)
            selected = [f for f in functions if chosen is None or f["name"] == chosen]
            parallel = bool(body.get("parallel_tool_calls", grammar_cfg.get("parallel_calls", True))) \
                and not legacy and chosen is None
            required = mode == "required"
            call: str | None = None
            if not grammar_cfg.get("disable"):
                call = schema_to_gbnf(_call_schema(selected, parallel), where)
                if not required:
                    call = _mixed(call) if grammar_cfg.get("mixed_mode", True) else None
            return ToolPlan(call, offered, True, required, legacy, frozenset(names))
    elif choice not in (None, "none", "auto"):
        raise InvalidRequest("'tool_choice' needs 'tools'", param="tool_choice")

    structure = body.get("grammar_json_functions")
    if structure is not None:
        if not isinstance(structure, dict):
            raise InvalidRequest("Invalid value for 'grammar_json_functions': must be an object",
                                 param="grammar_json_functions")
        check_schema(structure, "grammar_json_functions")
        return ToolPlan(schema_to_gbnf(structure, "grammar_json_functions"), calls_expected=True)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return ToolPlan(_response_format_grammar(fmt))
    if isinstance(fmt, str) and fmt not in ("text",):
        raise InvalidRequest("Invalid value for 'response_format': expected an object such as "
                             '{"type": "json_object"}', param="response_format")
    return ToolPlan(grammar)


def _tool_choice(choice: Any, names: set[str], legacy: bool) -> tuple[str, str | None]:
    param = "function_call" if legacy else "tool_choice"
    if choice is None:
        return "auto", None
    if choice in ("auto", "none", "required"):
        return choice, None
    if isinstance(choice, dict):
        name = choice.get("name") if legacy else (choice.get("function") or {}).get("name")
        if not legacy and choice.get("type", "function") != "function":
            raise InvalidRequest(f"Invalid value for '{param}': type must be 'function'", param=param)
        if name not in names:
            raise InvalidRequest(f"Invalid value for '{param}': no tool named {name!r} (tools: "
                                 f"{', '.join(sorted(names))})", param=param)
        return "required", name
    raise InvalidRequest(f"Invalid value for '{param}': expected 'auto', 'none', 'required' or a named function",
                         param=param)


def _response_format_grammar(fmt: Mapping[str, Any]) -> str:
    kind = fmt.get("type")
    if kind == "json_object":
        return schema_to_gbnf({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidRequest("'response_format.json_schema' needs a 'name' and a 'schema'",
                                 param="response_format.json_schema")
        schema = spec.get("schema", {"type": "object"})
        check_schema(schema, "response_format.json_schema.schema")
        return schema_to_gbnf(schema, "response_format.json_schema.schema")
    raise InvalidRequest(f"Invalid value for 'response_format.type': {kind!r} (expected text, json_object or "
                         "json_schema)", param="response_format.type")


# -- model text -> tool calls -------------------------------------------------------------------------------

def looks_like_call(text: str) -> bool:
    stripped = text.lstrip()
    return stripped[:1] in ("{", "[")


def parse_calls(text: str, names: frozenset[str] | None = None) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` from a model's JSON answer, or None when it is not a call."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        if names and item["name"] not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append({"id": new_call_id(), "type": "function",
                      "function": {"name": item["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return calls or None


def tool_prompt(tools: tuple[dict[str, Any], ...], required: bool) -> str:
    """Instructions for templates that do not render ``tools`` themselves."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    must = "You must call one of them." if required else "Call one when it helps; otherwise answer in plain text."
    return ("You can call these functions:\n" + listing + "\nTo call a function, answer only with JSON: "
            '{"name": <function name>, "arguments": <arguments object>}. ' + must)
