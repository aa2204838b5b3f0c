"""Marshmallow schemas generated at import from the vendored Swagger file (``spec/localai-swagger.json``).

Nothing here is written per field. The few places where the spec and real clients disagree are
declared as data (``ROUTE_REQUIRED``, ``FIELD_OVERRIDES``, ``EXTRA_ENUM``), not by editing the spec:
- ``schema.OpenAIRequest`` marks ``file`` required (an artefact); each route names its own required fields.
- untyped properties (``content``, ``prompt``, ``stop``, ``input``, ``tool_choice``...) get a type check
  listing what they may be;
- ``response_format`` is an object for chat but a string for audio and images;
- unknown fields are kept (INCLUDE): clients send fields the spec lacks (``stream_options``, ``user``...).
Numbers and booleans are strict: ``"0.7"`` is not a number and ``"yes"`` is not a boolean.
"""

from __future__ import annotations

import json
import numbers
from functools import cache
from importlib import resources
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate

from localai_aio.text.prompts import ROLES

SPEC_FILE = "localai-swagger.json"

#: Bounds of the sampling fields, (low, high or None): read by ``api.sampling`` and shown in the document.
BOUNDS: dict[str, tuple[float, float | None]] = {
    "temperature": (0, 2), "top_p": (0, 1), "top_k": (0, None), "min_p": (0, 1), "repeat_penalty": (0, 10),
    "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2), "max_tokens": (1, None), "n": (1, 16),
    "seed": (-(2**63), 2**63 - 1), "typical_p": (0, 1), "mirostat": (0, 2), "mirostat_tau": (0, 100),
    "mirostat_eta": (0, 1), "repeat_last_n": (-1, None),
}


@cache
def seed_spec() -> dict[str, Any]:
    return json.loads(resources.files("localai_aio").joinpath("spec", SPEC_FILE).read_text("utf-8"))


class StrictFloat(fields.Float):
    """A JSON number only: rejects strings (``"0.7"``) and booleans."""

    def _validated(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.make_error("invalid")
        return super()._validated(value)


class StrictInteger(fields.Integer):
    """A JSON integer only: rejects strings, booleans and fractional numbers."""

    def __init__(self, **kwargs: Any):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> Any:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._validated(value)


class StrictBoolean(fields.Boolean):
    truthy = {True}
    falsy = {False}


def _variants(shape: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return shape if isinstance(shape, list) else [shape]


class OneOfTypes(fields.Raw):
    """An untyped spec property: accept only the listed JSON types. ``shapes`` says in the served
    document what each type holds (``anyOf``), so generated requests look like real ones."""

    _NAMES = {str: "a string", list: "an array", dict: "an object", int: "an integer", float: "a number"}
    _JSON = {str: "string", list: "array", dict: "object", int: "integer", float: "number"}

    def __init__(self, *types: type, shapes: dict[type, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.types = types
        shapes = shapes or {}
        self.metadata["anyOf"] = [{"type": self._JSON[t], **shape} for t in types
                                  for shape in _variants(shapes.get(t, {}))]

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, self.types):
            raise ValidationError("Must be " + " or ".join(self._NAMES[t] for t in self.types) + ".")
        return value


_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_TEXT = {"minLength": 1}
# a list of texts, of token ids, or of lists of token ids (never a mix)
_TEXTS = [{"minItems": 1, "items": {"type": "string", **_TEXT}}, _TOKEN_IDS,
          {"minItems": 1, "items": _TOKEN_IDS}]
_PARTS = {"items": {"type": "object", "required": ["type", "text"],
                    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}

# the Responses API's input items
_ITEMS = {"minItems": 1, "items": {"anyOf": [
    {"type": "object", "required": ["role", "content"],
     "properties": {"type": {"type": "string", "enum": ["message"]},
                    "role": {"type": "string", "enum": ["user", "system", "developer", "assistant"]},
                    "content": {"type": "string", "minLength": 1}}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"],
     "properties": {"type": {"type": "string", "enum": ["function_call"]},
                    "call_id": {"type": "string", "minLength": 1}, "name": {"type": "string", "minLength": 1},
                    "arguments": {"type": "string"}}},
    {"type": "object", "required": ["type", "call_id", "output"],
     "properties": {"type": {"type": "string", "enum": ["function_call_output"]},
                    "call_id": {"type": "string", "minLength": 1}, "output": {"type": "string"}}},
]}}

# Anthropic's Messages API (api/messages.py): its content blocks, and what its two routes both read.
_ANTHROPIC_TEXT = {"type": "object", "required": ["type", "text"],
                   "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
_ANTHROPIC_BLOCKS = {"items": {"anyOf": [
    _ANTHROPIC_TEXT,
    {"type": "object", "required": ["type", "id", "name", "input"],
     "properties": {"type": {"type": "string", "enum": ["tool_use"]}, "id": {"type": "string"},
                    "name": {"type": "string"}, "input": {"type": "object"}}},
    {"type": "object", "required": ["type", "tool_use_id"],
     "properties": {"type": {"type": "string", "enum": ["tool_result"]}, "tool_use_id": {"type": "string"},
                    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _ANTHROPIC_TEXT}]},
                    "is_error": {"type": "boolean"}}},
]}}
# /v1/rerank's documents: texts, or objects holding one (Cohere's and Jina's {"text": ...})
_DOCUMENTS = {"minItems": 1, "items": {"anyOf": [
    {"type": "string"}, {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}]}}

_ANTHROPIC_PROMPT = {
    "model": {"type": "string"},
    "system": {"description": "A string or a list of text blocks"},
    "messages": {"type": "array", "items": {"$ref": "#/definitions/anthropic.Message"}},
    "tools": {"type": "array", "items": {"$ref": "#/definitions/anthropic.Tool"}},
    "tool_choice": {"description": "{\"type\": auto | any | tool | none}; tool names the tool"},
}

_OLLAMA_COMMON = {
    "model": {"type": "string", "description": "A model, an alias, or either with a tag (name:latest)"},
    "stream": {"type": "boolean", "description": "NDJSON, one object a line (default true)"},
    "format": {"description": "\"json\", or a JSON schema the answer follows"},
    "options": {"type": "object", "description": "Sampling: temperature, top_k, top_p, min_p, seed, num_predict, "
                                                 "stop, repeat_penalty, presence_penalty, frequency_penalty, "
                                                 "mirostat, mirostat_tau, mirostat_eta, typical_p, repeat_last_n"},
    "keep_alive": {"description": "0 unloads the model after this request; other values are accepted"},
    "think": {"description": "true, false, \"low\", \"medium\" or \"high\": the reasoning in `thinking`"},
}

# Untyped or mistyped properties of the spec, by "definition.property" or by property name: what real
# clients send there.
FIELD_OVERRIDES: dict[str, Any] = {
    "content": lambda: OneOfTypes(str, list, allow_none=True, shapes={list: _PARTS}),
    "prompt": lambda: OneOfTypes(str, list, shapes={str: _TEXT, list: _TEXTS}),
    "stop": lambda: OneOfTypes(str, list, allow_none=True, shapes={list: {"items": {"type": "string"}}}),
    "input": lambda: OneOfTypes(str, list, shapes={str: _TEXT, list: _TEXTS}),
    "schema.TTSRequest.input": fields.String,
    "localai.TokenizeRequest.content": fields.String,
    "localai.TokenizeRequest.prompt": fields.String,
    "tool_choice": lambda: OneOfTypes(str, dict, shapes={str: {"enum": ["none", "auto", "required"]}}),
    "function_call": lambda: OneOfTypes(str, dict, shapes={str: {"enum": ["none", "auto"]}}),
    "openai.ResponsesRequest.input": lambda: OneOfTypes(str, list, shapes={str: _TEXT, list: _ITEMS}),
    # an object ({"type": "json_object"}) for chat, a string ("b64_json", "srt") for images and audio
    "response_format": lambda: OneOfTypes(dict, str),
    # Anthropic's fields share names with OpenAI's but not shapes; its temperature is 0..1
    "anthropic.Message.content": lambda: OneOfTypes(str, list, shapes={list: _ANTHROPIC_BLOCKS}),
    **{f"anthropic.{body}.{prop}": make for body in ("MessagesRequest", "CountTokensRequest") for prop, make in {
        "system": lambda: OneOfTypes(str, list, shapes={list: {"items": _ANTHROPIC_TEXT}}),
        "messages": lambda: fields.List(fields.Nested(lambda: definition_schema("anthropic.Message")()),
                                        validate=validate.Length(min=1)),
        "tool_choice": lambda: fields.Nested(lambda: definition_schema("anthropic.ToolChoice")()),
    }.items()},
    "schema.JINARerankRequest.documents": lambda: OneOfTypes(list, shapes={list: _DOCUMENTS}),
    "anthropic.MessagesRequest.max_tokens": lambda: StrictInteger(validate=validate.Range(min=1)),
    "anthropic.MessagesRequest.temperature": lambda: StrictFloat(validate=validate.Range(0, 1)),
    "anthropic.MessagesRequest.top_p": lambda: StrictFloat(validate=validate.Range(0, 1)),
    "anthropic.MessagesRequest.top_k": lambda: StrictInteger(validate=validate.Range(min=0)),
    # Ollama's: a prompt and a message's content are one string; format is "json" or a JSON schema
    "ollama.GenerateRequest.prompt": fields.String,
    "ollama.EmbeddingsRequest.prompt": fields.String,
    "ollama.Message.content": fields.String,
    **{f"ollama.{body}.format": lambda: OneOfTypes(str, dict, shapes={str: {"enum": ["json"]}})
       for body in ("ChatRequest", "GenerateRequest")},
    **{f"ollama.{body}.keep_alive": lambda: OneOfTypes(str, int, float)
       for body in ("ChatRequest", "GenerateRequest", "EmbedRequest", "EmbeddingsRequest")},
    "ollama.ChatRequest.messages": lambda: fields.List(fields.Nested(lambda: definition_schema("ollama.Message")())),
    "openai.ResponsesRequest.truncation": lambda: fields.String(
        validate=validate.OneOf(["disabled", "auto"], error="'auto' or 'disabled'")),
}

# Documented constraints of single properties, as "definition.property": JSON-schema keywords. The
# checks themselves are made where the field is read; the values come from the same constants.
FIELD_DOCS: dict[str, dict[str, Any]] = {
    "schema.OpenAIRequest.messages": {"minItems": 1},
    "schema.Message.role": {"enum": sorted(ROLES)},
    "schema.TTSRequest.input": {"minLength": 1, "pattern": r"\S"},  # speech needs some text
    "schema.JINARerankRequest.top_n": {"minimum": 1},
    "openai.ResponsesRequest.max_output_tokens": {"minimum": 1},
    "openai.ResponsesRequest.temperature": {"minimum": 0, "maximum": 2},
    "openai.ResponsesRequest.top_p": {"minimum": 0, "maximum": 1},
    **{f"schema.OpenAIRequest.{name}": {"minimum": lo, **({"maximum": hi} if hi is not None else {})}
       for name, (lo, hi) in BOUNDS.items()},
}

# Enum values real clients use that the seed's enums lack.
EXTRA_ENUM: dict[str, list[str]] = {"openai.ToolType": ["file_search"]}

# Bodies of routes the seed spec lacks, in the spec's own format (they go through the same builder).
EXTRA_DEFINITIONS: dict[str, Any] = {
    "localai.AssistantFileRequest": {
        "type": "object", "required": ["file_id"],
        "properties": {"file_id": {"type": "string", "description": "A file uploaded to /v1/files"}},
    },
    "localai.TokenizeRequest": {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "content": {"type": "string", "description": "The text (llama.cpp's and LocalAI's name)"},
            "prompt": {"type": "string", "description": "The text (vLLM's name)"},
            "add_special": {"type": "boolean", "description": "Add the model's BOS token (default false)"},
            "add_special_tokens": {"type": "boolean", "description": "vLLM's name for it (default true)"},
            "with_pieces": {"type": "boolean", "description": "Each token as {id, piece}"},
        },
    },
    "localai.DetokenizeRequest": {
        "type": "object", "required": ["tokens"],
        "properties": {"model": {"type": "string"},
                       "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    },
    # LocalAI's rerank body (Jina's API; its swagger calls it schema.JINARerankRequest), with Jina's and
    # Cohere's return_documents and documents as {"text": ...} objects too
    "schema.JINARerankRequest": {
        "type": "object", "required": ["query", "documents"],
        "properties": {
            "model": {"type": "string"},
            "query": {"type": "string", "description": "What the documents are ranked by"},
            "documents": {"description": "The texts to rank: strings, or objects with a `text`"},
            "top_n": {"type": "integer", "description": "Only the top_n most relevant (default: all)"},
            "return_documents": {"type": "boolean", "description": "Give each result's text as "
                                                                   "document.text (default true)"},
        },
    },
    "openai.ResponsesRequest": {
        "type": "object", "required": ["input"],
        "properties": {
            "model": {"type": "string"},
            "input": {"description": "A string, or a list of message, function_call and function_call_output "
                                     "items"},
            "instructions": {"type": "string", "description": "A system message for this response only"},
            "tools": {"type": "array", "items": {"type": "object"}, "description": "Function tools (flat shape)"},
            "tool_choice": {"description": "none, auto, required, or {\"type\": \"function\", \"name\": ...}"},
            "parallel_tool_calls": {"type": "boolean"},
            "text": {"type": "object", "description": "{\"format\": {\"type\": text | json_object | json_schema}}"},
            "temperature": {"type": "number"},
            "top_p": {"type": "number"},
            "max_output_tokens": {"type": "integer"},
            "seed": {"type": "integer"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "store": {"type": "boolean", "description": "Keep the response for GET and previous_response_id "
                                                        "(default true)"},
            "previous_response_id": {"type": "string"},
            "truncation": {"type": "string"},
            "stream": {"type": "boolean"},
            "background": {"type": "boolean"},
            "user": {"type": "string"},
        },
    },
    "anthropic.Role": {"type": "string", "enum": ["user", "assistant"]},
    "anthropic.Message": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"$ref": "#/definitions/anthropic.Role"},
                       "content": {"description": "A string or a list of text, tool_use and tool_result blocks"}},
    },
    "anthropic.Tool": {  # input_schema is required of custom tools: checked with the tool's type
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                       "input_schema": {"type": "object", "description": "A JSON schema of the tool's input"},
                       "type": {"type": "string", "description": "custom (the default); server tools are not "
                                                                 "supported"}},
    },
    "anthropic.ToolChoiceType": {"type": "string", "enum": ["auto", "any", "tool", "none"]},
    "anthropic.ToolChoice": {
        "type": "object", "required": ["type"],
        "properties": {"type": {"$ref": "#/definitions/anthropic.ToolChoiceType"}, "name": {"type": "string"},
                       "disable_parallel_tool_use": {"type": "boolean"}},
    },
    "anthropic.MessagesRequest": {
        "type": "object", "required": ["model", "messages", "max_tokens"],
        "properties": {
            **_ANTHROPIC_PROMPT,
            "max_tokens": {"type": "integer"},
            "stop_sequences": {"type": "array", "items": {"type": "string"}},
            "temperature": {"type": "number"},
            "top_p": {"type": "number"},
            "top_k": {"type": "integer"},
            "stream": {"type": "boolean"},
            "metadata": {"type": "object", "description": "Accepted and ignored"},
        },
    },
    "anthropic.CountTokensRequest": {"type": "object", "required": ["model", "messages"],
                                     "properties": _ANTHROPIC_PROMPT},
    # Ollama's API (api/ollama/): the options' values are checked where they become sampling parameters
    "ollama.Message": {
        "type": "object", "required": ["role"],
        "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
                       "content": {"type": "string"}, "thinking": {"type": "string"},
                       "images": {"type": "array", "items": {"type": "string"}},
                       "tool_calls": {"type": "array", "items": {"type": "object"}},
                       "tool_name": {"type": "string"}},
    },
    "ollama.ChatRequest": {
        "type": "object", "required": ["model"],
        "properties": {**_OLLAMA_COMMON,
                       "messages": {"type": "array", "items": {"$ref": "#/definitions/ollama.Message"}},
                       "tools": {"type": "array", "items": {"type": "object"}}},
    },
    "ollama.GenerateRequest": {
        "type": "object", "required": ["model"],
        "properties": {**_OLLAMA_COMMON, "prompt": {"type": "string"}, "suffix": {"type": "string"},
                       "system": {"type": "string"}, "template": {"type": "string"}, "raw": {"type": "boolean"},
                       "images": {"type": "array", "items": {"type": "string"}},
                       "context": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    },
    "ollama.EmbedRequest": {
        "type": "object", "required": ["model", "input"],
        "properties": {"model": {"type": "string"}, "input": {"description": "A string or a list of strings"},
                       "truncate": {"type": "boolean"}, "dimensions": {"type": "integer", "minimum": 1},
                       "options": {"type": "object"}, "keep_alive": _OLLAMA_COMMON["keep_alive"]},
    },
    "ollama.EmbeddingsRequest": {
        "type": "object", "required": ["model", "prompt"],
        "properties": {"model": {"type": "string"}, "prompt": {"type": "string"}, "options": {"type": "object"},
                       "keep_alive": _OLLAMA_COMMON["keep_alive"]},
    },
    "ollama.ModelRequest": {  # show, pull, delete: "model" (older clients send "name")
        "type": "object",
        "properties": {"model": {"type": "string"}, "name": {"type": "string"}, "verbose": {"type": "boolean"},
                       "insecure": {"type": "boolean"}, "stream": {"type": "boolean"}},
    },
}

# Required fields per (method, path); overrides the definition's own ``required``.
ROUTE_REQUIRED: dict[tuple[str, str], tuple[str, ...]] = {
    ("post", "/v1/chat/completions"): ("messages",),
    ("post", "/v1/completions"): ("prompt",),
    ("post", "/v1/embeddings"): ("input",),
    ("post", "/v1/images/generations"): ("prompt",),
    ("post", "/v1/audio/speech"): ("input",),
    ("post", "/v1/text-to-speech/{voice-id}"): (),
    ("post", "/v1/assistants"): ("model",),
}


class _KeepUnknown(Schema):
    class Meta:
        unknown = INCLUDE  # keep what clients send beyond the spec


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


class _Builder:
    def __init__(self, spec: dict[str, Any]):
        self.definitions = {**spec.get("definitions", {}), **EXTRA_DEFINITIONS}
        self.schemas: dict[str, type[Schema]] = {}

    def schema(self, name: str, required: tuple[str, ...] | None = None) -> type[Schema]:
        key = name if required is None else f"{name}[{','.join(required)}]"
        if key not in self.schemas:
            self.schemas[key] = self._build(name, required)
        return self.schemas[key]

    def _build(self, name: str, required: tuple[str, ...] | None) -> type[Schema]:
        definition = self.definitions[name]
        needed = set(definition.get("required", ()) if required is None else required)
        attrs: dict[str, Any] = {}
        for prop, sub in definition.get("properties", {}).items():
            attrs[prop] = self.field(prop, sub, required=prop in needed, definition=name)
            attrs[prop].metadata.update(FIELD_DOCS.get(f"{name}.{prop}", {}))
        for prop in needed - set(attrs):
            attrs[prop] = fields.Raw(required=True)
        schema_name = name if required is None else f"{name}.{'_'.join(required) or 'none'}"
        return _KeepUnknown.from_dict(attrs, name=schema_name)

    def field(self, prop: str | None, sub: dict[str, Any], required: bool = False,
              definition: str = "") -> fields.Field:
        kwargs: dict[str, Any] = {"required": required}
        if sub.get("description"):
            kwargs["metadata"] = {"description": sub["description"]}
        override = FIELD_OVERRIDES.get(f"{definition}.{prop}", FIELD_OVERRIDES.get(prop))
        if override is not None:
            made = override()
            made.required = required
            made.metadata.update(kwargs.get("metadata", {}))
            return made
        if len(sub.get("allOf", ())) == 1:
            sub = {**sub.get("allOf")[0], **{k: v for k, v in sub.items() if k != "allOf"}}
        if "$ref" in sub:
            target = _ref_name(sub["$ref"])
            definition = self.definitions[target]
            if "enum" in definition:
                choices = list(definition["enum"]) + EXTRA_ENUM.get(target, [])
                return fields.String(validate=validate.OneOf(choices), allow_none=False, **kwargs)
            return fields.Nested(lambda target=target: self.schema(target)(), **kwargs)
        kind = sub.get("type")
        if kind == "string":
            return fields.String(**kwargs)
        if kind == "integer":
            return StrictInteger(**kwargs)
        if kind == "number":
            return StrictFloat(**kwargs)
        if kind == "boolean":
            return StrictBoolean(**kwargs)
        if kind == "array":
            return fields.List(self.field(None, sub.get("items", {})), **kwargs)
        if kind == "object":
            extra = sub.get("additionalProperties")
            if isinstance(extra, dict):
                return fields.Dict(keys=fields.String(), values=self.field(None, extra), **kwargs)
            return fields.Dict(**kwargs)
        return fields.Raw(allow_none=True, **kwargs)


@cache
def _builder() -> _Builder:
    return _Builder(seed_spec())


def body_schema(method: str, path: str) -> type[Schema]:
    """The request-body schema of a spec route, with that route's required fields."""
    operation = seed_spec()["paths"][path][method]
    body = next(p for p in operation["parameters"] if p.get("in") == "body")
    name = _ref_name(body["schema"]["$ref"])
    return _builder().schema(name, ROUTE_REQUIRED.get((method, path)))


def definition_schema(name: str) -> type[Schema]:
    return _builder().schema(name)


def route_summary(method: str, path: str) -> str:
    return seed_spec()["paths"].get(path, {}).get(method, {}).get("summary", "")
