"""Function calling and structured output: request fields -> a validated plan and its grammar.

The output is constrained with a grammar in llguidance's Lark dialect whose JSON parts are the request's
JSON schemas themselves (``%json {...}``), compiled by llguidance's own JSON schema compiler: a
``pattern`` is matched against the string's value, not its escaped text, strings never hold raw control
characters, and a schema no answer can satisfy is refused before generation. So a call the model makes
always parses and matches the tool's parameters:
- tool calls are written in the model's own format (``tool_formats``: Hermes/Qwen, Mistral, Llama 3.x,
  or the generic JSON answer); the grammar for that format is built once the chat template is known;
- ``tool_choice: "auto"`` lets the model answer in text until it starts a call; ``"required"`` or a
  named function constrains the answer from its first token;
- ``response_format`` ``json_object`` / ``json_schema`` and LocalAI's ``grammar`` /
  ``grammar_json_functions`` constrain the whole answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from localai_aio.errors import InvalidRequest
from localai_aio.text.tool_formats import ToolFormat

MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks for, after validation."""

    grammar: str | None = None  # response_format / grammar fields: the whole answer's constraint
    grammar_param: str = "grammar"  # the request field the constraint comes from (named in its errors)
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI tool definitions offered to the model (for the prompt)
    calls_expected: bool = False  # the output may (auto) or must (required) be parsed into tool calls
    required: bool = False
    legacy: bool = False  # `functions` / `function_call`: answer with `function_call`
    names: frozenset[str] = field(default_factory=frozenset)
    callable_json: str | None = None  # the functions a call may name, as JSON (their grammar's cache key)
    parallel: bool = False
    constrain: bool = True  # the model YAML may turn the tools grammar off (`function.grammar`)

    def constraint(self, fmt: ToolFormat) -> tuple[str | None, str | None]:
        """The grammar for this request in the model's tool format, and the text that triggers it."""
        if self.callable_json is None:
            return self.grammar, None
        if not self.constrain:
            return None, None
        return fmt.grammar(call_rule(self.callable_json, fmt.key), parallel=self.parallel, required=self.required)


def check_schema(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise InvalidRequest(f"Invalid value for '{param}': a JSON schema must be an object", param=param)
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(f"Invalid JSON schema in '{param}': {exc.message}", param=param) from None


#: How llguidance writes JSON for every schema here: one canonical layout (``{"a": 1, "b": [2, 3]}``), so
#: a model can never spend its tokens on blanks between values, and keywords llguidance cannot enforce are
#: refused, never silently ignored: a strict answer is one that validates.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


def json_value(schema: Mapping[str, Any]) -> str:
    """The Lark body (``%json {...}``) of one JSON value matching ``schema``."""
    options = {**JSON_OPTIONS, **schema.get("x-guidance", {})} if isinstance(schema.get("x-guidance"), dict) \
        else JSON_OPTIONS
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def schema_grammar(schema: Mapping[str, Any]) -> str:
    """A grammar whose whole answer is one JSON value matching ``schema``."""
    return f"%llguidance {{}}\nstart: {json_value(schema)}\n"


@lru_cache(maxsize=64)
def call_rule(functions_json: str, key: str) -> str:
    """The ``tool_call`` rule: one call object of the given functions (cached: an agent offers the same
    tools on every turn)."""
    functions = json.loads(functions_json)
    one = [{"type": "object", "properties": {"name": {"const": f["name"]}, key: f["parameters"]},
            "required": ["name", key]} for f in functions]
    return "tool_call: " + json_value(one[0] if len(one) == 1 else {"anyOf": one})


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
            callable_json = json.dumps(selected, sort_keys=True)
            constrain = not grammar_cfg.get("disable") and (required or grammar_cfg.get("mixed_mode", True))
            return ToolPlan(None, where, offered, True, required, legacy, frozenset(names), callable_json,
                            parallel, bool(constrain))
    elif choice not in (None, "none", "auto"):
        raise InvalidRequest("'tool_choice' needs 'tools'", param="tool_choice")

    structure = body.get("grammar_json_functions")
    if structure is not None:
        if not isinstance(structure, dict):
            raise InvalidRequest("Invalid value for 'grammar_json_functions': must be an object",
                                 param="grammar_json_functions")
        check_schema(structure, "grammar_json_functions")
        return ToolPlan(schema_grammar(structure), "grammar_json_functions", calls_expected=True)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return ToolPlan(*_response_format_grammar(fmt))
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


def _response_format_grammar(fmt: Mapping[str, Any]) -> tuple[str, str]:
    """The grammar of a ``response_format`` and the field it comes from."""
    kind = fmt.get("type")
    if kind == "json_object":
        return schema_grammar({"type": "object"}), "response_format"
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidRequest("'response_format.json_schema' needs a 'name' and a 'schema'",
                                 param="response_format.json_schema")
        schema = spec.get("schema", {"type": "object"})
        check_schema(schema, "response_format.json_schema.schema")
        return schema_grammar(schema), "response_format.json_schema.schema"
    raise InvalidRequest(f"Invalid value for 'response_format.type': {kind!r} (expected text, json_object or "
                         "json_schema)", param="response_format.type")


# -- prompts for templates that do not render tools -------------------------------------------------------

def tool_prompt(tools: tuple[dict[str, Any], ...], required: bool) -> str:
    """Instructions for templates that do not render ``tools`` themselves."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    must = "You must call one of them." if required else "Call one when it helps; otherwise answer in plain text."
    return ("You can call these functions:\n" + listing + "\nTo call a function, answer only with JSON: "
            '{"name": <function name>, "arguments": <arguments object>}. ' + must)
