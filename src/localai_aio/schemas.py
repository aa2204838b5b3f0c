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

SPEC_FILE = "localai-swagger.json"


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


class OneOfTypes(fields.Raw):
    """An untyped spec property: accept only the listed JSON types."""

    _NAMES = {str: "a string", list: "an array", dict: "an object", int: "an integer", float: "a number"}

    def __init__(self, *types: type, **kwargs: Any):
        super().__init__(**kwargs)
        self.types = types

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, self.types):
            raise ValidationError("Must be " + " or ".join(self._NAMES[t] for t in self.types) + ".")
        return value


# Untyped or mistyped properties of the spec, by property name: what real clients send there.
FIELD_OVERRIDES: dict[str, Any] = {
    "content": lambda: OneOfTypes(str, list, allow_none=True),
    "prompt": lambda: OneOfTypes(str, list),
    "stop": lambda: OneOfTypes(str, list, allow_none=True),
    "input": lambda: OneOfTypes(str, list),
    "tool_choice": lambda: OneOfTypes(str, dict),
    "function_call": lambda: OneOfTypes(str, dict),
    # an object ({"type": "json_object"}) for chat, a string ("b64_json", "srt") for images and audio
    "response_format": lambda: OneOfTypes(dict, str),
}

# Enum values real clients use that the seed's enums lack.
EXTRA_ENUM: dict[str, list[str]] = {"openai.ToolType": ["file_search"]}

# Bodies of routes the seed spec lacks, in the spec's own format (they go through the same builder).
EXTRA_DEFINITIONS: dict[str, Any] = {
    "localai.AssistantFileRequest": {
        "type": "object", "required": ["file_id"],
        "properties": {"file_id": {"type": "string", "description": "A file uploaded to /v1/files"}},
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
        attrs: dict[str, Any] = {
            prop: self.field(prop, sub, required=prop in needed)
            for prop, sub in definition.get("properties", {}).items()
        }
        for prop in needed - set(attrs):
            attrs[prop] = fields.Raw(required=True)
        schema_name = name if required is None else f"{name}.{'_'.join(required) or 'none'}"
        return _KeepUnknown.from_dict(attrs, name=schema_name)

    def field(self, prop: str | None, sub: dict[str, Any], required: bool = False) -> fields.Field:
        kwargs: dict[str, Any] = {"required": required}
        if sub.get("description"):
            kwargs["metadata"] = {"description": sub["description"]}
        if prop in FIELD_OVERRIDES:
            made = FIELD_OVERRIDES[prop]()
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
