"""What the served OpenAPI document says beyond the request schemas: answers, links and models.

The request bodies come from the same marshmallow schemas that validate them (``schemas.py``); this
module adds what those cannot know:
- the shapes of the answers, so clients and fuzzers can check what comes back;
- links from a created object to the routes that read, change or delete it, so a stateful fuzzer
  can follow them (create an assistant, then fetch it);
- which models each route can use: ``model`` is an enum of the configured models (and aliases)
  that serve the route's use case, because any other name is refused.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from localai_aio.registry import usecases
from localai_aio.server import keys
from localai_aio.text.prompts import ROLES

#: Where apigami keeps the generated document.
_DOCUMENT = "swagger_dict"
#: Handlers declare their use case with this operation key; it becomes the ``model`` enum.
USE_CASE = "x-model-use-case"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(name: str) -> dict[str, Any]:
    return {"type": "object", "required": ["object", "data"],
            "properties": {"object": {"type": "string", "enum": ["list"]},
                           "data": {"type": "array", "items": _ref(name)},
                           "first_id": {"type": "string", "nullable": True},
                           "last_id": {"type": "string", "nullable": True}, "has_more": {"type": "boolean"}}}


_USAGE = {"type": "object", "required": ["prompt_tokens", "total_tokens"],
          "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                         "total_tokens": {"type": "integer"}}}

_ALIGNMENT = {"type": "object", "required": ["characters", "character_start_times_seconds",
                                            "character_end_times_seconds"],
              "properties": {"characters": {"type": "array", "items": {"type": "string"}},
                             "character_start_times_seconds": {"type": "array", "items": {"type": "number"}},
                             "character_end_times_seconds": {"type": "array", "items": {"type": "number"}}}}

COMPONENTS: dict[str, Any] = {
    "securitySchemes": {"BearerAuth": {"type": "http", "scheme": "bearer"}},
    "schemas": {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": "string", "nullable": True},
                           "code": {"anyOf": [{"type": "string"}, {"type": "integer"}], "nullable": True}}}}},
        "Model": {"type": "object", "required": ["id", "object"],
                  "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
                                 "owned_by": {"type": "string"}}},
        "ModelList": _list_of("Model"),
        "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices"],
                           "properties": {"id": {"type": "string"},
                                          "object": {"type": "string", "enum": ["chat.completion"]},
                                          "created": {"type": "integer"}, "model": {"type": "string"},
                                          "choices": {"type": "array", "items": {
                                              "type": "object", "required": ["index", "message", "finish_reason"],
                                              "properties": {"index": {"type": "integer"},
                                                             "message": {"type": "object", "required": ["role"]},
                                                             "finish_reason": {"type": "string", "nullable": True}}}},
                                          "usage": _USAGE}},
        "Completion": {"type": "object", "required": ["id", "object", "created", "model", "choices"],
                       "properties": {"id": {"type": "string"},
                                      "object": {"type": "string", "enum": ["text_completion"]},
                                      "created": {"type": "integer"}, "model": {"type": "string"},
                                      "choices": {"type": "array", "items": {
                                          "type": "object", "required": ["index", "text", "finish_reason"],
                                          "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                                         "finish_reason": {"type": "string", "nullable": True}}}},
                                      "usage": _USAGE}},
        "Embeddings": {"type": "object", "required": ["object", "data", "model", "usage"],
                       "properties": {"object": {"type": "string", "enum": ["list"]}, "model": {"type": "string"},
                                      "data": {"type": "array", "items": {
                                          "type": "object", "required": ["object", "index", "embedding"],
                                          "properties": {"object": {"type": "string", "enum": ["embedding"]},
                                                         "index": {"type": "integer"},
                                                         "embedding": {"anyOf": [
                                                             {"type": "array", "items": {"type": "number"}},
                                                             {"type": "string"}]}}}},
                                      "usage": _USAGE}},
        "Rerank": {"type": "object", "required": ["model", "results", "usage"],
                   "properties": {"model": {"type": "string"}, "usage": _USAGE,
                                  "results": {"type": "array", "items": {
                                      "type": "object", "required": ["index", "relevance_score"],
                                      "properties": {"index": {"type": "integer"},
                                                     "relevance_score": {"type": "number", "minimum": 0,
                                                                         "maximum": 1},
                                                     "document": {"type": "object", "required": ["text"],
                                                                  "properties": {"text": {"type": "string"}}}}}}}},
        "Assistant": {"type": "object", "required": ["id", "object", "created_at", "model"],
                      "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["assistant"]},
                                     "created_at": {"type": "integer"}, "model": {"type": "string"},
                                     "name": {"type": "string", "nullable": True},
                                     "instructions": {"type": "string", "nullable": True},
                                     "tools": {"type": "array"}, "file_ids": {"type": "array"},
                                     "metadata": {"type": "object"}}},
        "AssistantList": _list_of("Assistant"),
        "AssistantFile": {"type": "object", "required": ["id", "object", "assistant_id"],
                          "properties": {"id": {"type": "string"},
                                         "object": {"type": "string", "enum": ["assistant.file"]},
                                         "created_at": {"type": "integer"}, "assistant_id": {"type": "string"}}},
        "AssistantFileList": _list_of("AssistantFile"),
        "File": {"type": "object", "required": ["id", "object", "bytes", "created_at", "filename", "purpose"],
                 "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["file"]},
                                "bytes": {"type": "integer"}, "created_at": {"type": "integer"},
                                "filename": {"type": "string"}, "purpose": {"type": "string"}}},
        "FileList": _list_of("File"),
        "Response": {"type": "object", "required": ["id", "object", "created_at", "status", "model", "output"],
                     "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["response"]},
                                    "created_at": {"type": "integer"},
                                    "status": {"type": "string", "enum": ["queued", "in_progress", "completed",
                                                                          "incomplete", "failed", "cancelled"]},
                                    "model": {"type": "string"}, "output": {"type": "array", "items": {
                                        "type": "object", "required": ["type"],
                                        "properties": {"type": {"type": "string",
                                                                "enum": ["message", "function_call"]}}}},
                                    "usage": {"type": "object", "nullable": True},
                                    "previous_response_id": {"type": "string", "nullable": True}}},
        "ResponseItemList": _list_of("ResponseItem"),
        "ResponseItem": {"type": "object", "required": ["id", "type"],
                         "properties": {"id": {"type": "string"}, "type": {"type": "string", "enum": [
                             "message", "function_call", "function_call_output"]}}},
        "Transcription": {"type": "object", "required": ["text"],
                          "properties": {"text": {"type": "string"}, "language": {"type": "string"},
                                         "duration": {"type": "number"}, "segments": {"type": "array"}}},
        "Deleted": {"type": "object", "required": ["id", "object", "deleted"],
                    "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                   "deleted": {"type": "boolean"}}},
        "AnthropicMessage": {
            "type": "object", "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
            "properties": {
                "id": {"type": "string"}, "type": {"type": "string", "enum": ["message"]},
                "role": {"type": "string", "enum": ["assistant"]}, "model": {"type": "string"},
                "content": {"type": "array", "items": {"anyOf": [
                    {"type": "object", "required": ["type", "text"],
                     "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}},
                    {"type": "object", "required": ["type", "id", "name", "input"],
                     "properties": {"type": {"type": "string", "enum": ["tool_use"]}, "id": {"type": "string"},
                                    "name": {"type": "string"}, "input": {"type": "object"}}}]}},
                "stop_reason": {"type": "string", "enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
                "stop_sequence": {"type": "string", "nullable": True},
                "usage": {"type": "object", "required": ["input_tokens", "output_tokens"],
                          "properties": {"input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"},
                                         "cache_read_input_tokens": {"type": "integer"}}}}},
        "AnthropicTokenCount": {"type": "object", "required": ["input_tokens"],
                                "properties": {"input_tokens": {"type": "integer"}}},
        "Reloaded": {"type": "object", "required": ["added", "changed", "removed", "problems"], "properties": {
            name: {"type": "array", "items": {"type": "string"}} for name in ("added", "changed", "removed",
                                                                               "problems")}},
        "AudioWithTimestamps": {"type": "object", "required": ["audio_base64", "alignment"], "properties": {
            "audio_base64": {"type": "string"}, "alignment": _ALIGNMENT, "normalized_alignment": _ALIGNMENT}},
        "VoiceList": {"type": "object", "required": ["voices"], "properties": {"voices": {"type": "array", "items": {
            "type": "object", "required": ["voice_id", "name"],
            "properties": {"voice_id": {"type": "string"}, "name": {"type": "string"},
                           "category": {"type": "string"}, "labels": {"type": "object"}}}}}},
        "ElevenLabsError": {"type": "object", "required": ["detail"], "properties": {"detail": {
            "type": "object", "required": ["status", "message"],
            "properties": {"status": {"type": "string"}, "message": {"type": "string"},
                           "param": {"type": "string", "nullable": True}}}}},
        "AnthropicError": {"type": "object", "required": ["type", "error"], "properties": {
            "type": {"type": "string", "enum": ["error"]},
            "error": {"type": "object", "required": ["type", "message"],
                      "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}},
    },
}


#: Constraints of whole objects that no single field states, by component name.
SCHEMA_DOCS: dict[str, dict[str, Any]] = {
    "localai.TokenizeRequest": {"anyOf": [{"required": ["content"]}, {"required": ["prompt"]}]},
    "schema.Message": {"required": ["role"], "anyOf": [
        {"properties": {"role": {"enum": sorted(ROLES - {"tool"})}}},
        {"required": ["tool_call_id"], "properties": {"role": {"enum": ["tool"]}, "tool_call_id": {"type": "string"}}},
    ]},
}


def _link(path: str, method: str, **parameters: str) -> dict[str, Any]:
    pointer = path.replace("~", "~0").replace("/", "~1")
    return {"operationRef": f"#/paths/{pointer}/{method}", "parameters": parameters}


_ASSISTANT = "/v1/assistants/{assistant_id}"
_RESPONSE = "/v1/responses/{response_id}"
_FILE = "/v1/files/{file_id}"
#: Links from what a route returns to the routes that use it, by the schema of its answer.
LINKS: dict[str, dict[str, Any]] = {
    "Assistant": {
        "RetrieveAssistant": _link(_ASSISTANT, "get", assistant_id="$response.body#/id"),
        "ModifyAssistant": _link(_ASSISTANT, "post", assistant_id="$response.body#/id"),
        "ListAssistantFiles": _link(_ASSISTANT + "/files", "get", assistant_id="$response.body#/id"),
        "AttachFile": _link(_ASSISTANT + "/files", "post", assistant_id="$response.body#/id"),
        "DeleteAssistant": _link(_ASSISTANT, "delete", assistant_id="$response.body#/id"),
    },
    "AssistantFile": {
        "RetrieveAssistantFile": _link(_ASSISTANT + "/files/{file_id}", "get",
                                       assistant_id="$response.body#/assistant_id", file_id="$response.body#/id"),
        "DetachFile": _link(_ASSISTANT + "/files/{file_id}", "delete",
                            assistant_id="$response.body#/assistant_id", file_id="$response.body#/id"),
    },
    "Response": {
        "RetrieveResponse": _link(_RESPONSE, "get", response_id="$response.body#/id"),
        "ListInputItems": _link(_RESPONSE + "/input_items", "get", response_id="$response.body#/id"),
        "DeleteResponse": _link(_RESPONSE, "delete", response_id="$response.body#/id"),
    },
    "File": {
        "RetrieveFile": _link(_FILE, "get", file_id="$response.body#/id"),
        "DownloadFile": _link(_FILE + "/content", "get", file_id="$response.body#/id"),
        "DeleteFile": _link(_FILE, "delete", file_id="$response.body#/id"),
    },
}


def answers(schema: str | None = None, *, content_type: str = "application/json",
            stream: bool = False) -> dict[str, Any]:
    """``responses`` for a route's docs: its answer, with the links that follow from it (errors are
    added to every operation by ``describe_models``). ``stream``: it may also come as server-sent events."""
    ok: dict[str, Any] = {"description": "OK"}
    if schema is not None:
        ok["content"] = {content_type: {"schema": _ref(schema)}}
        if schema in LINKS:
            ok["links"] = LINKS[schema]
    elif content_type != "application/json":
        ok["content"] = {content_type: {"schema": {"type": "string", "format": "binary"}}}
    if stream:
        ok.setdefault("content", {})["text/event-stream"] = {"schema": {"type": "string"}}
    return {"200": ok}


def form_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """A multipart request body (uploads), as an operation's ``requestBody``."""
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": required, "properties": properties}}}}


_ERROR = {"description": "An OpenAI-style error", "content": {"application/json": {"schema": _ref("Error")}}}


def describe_models(app: web.Application) -> None:
    """Finish the generated document for this app: every operation answers errors in one shape, and a
    route's ``model`` lists the configured models that can serve it."""
    configs = app[keys.MODEL_CONFIGS]
    for name, extra in SCHEMA_DOCS.items():
        app[_DOCUMENT]["components"]["schemas"][name].update(extra)
    for item in app[_DOCUMENT]["paths"].values():
        for operation in item.values():
            operation.pop("produces", None)  # apigami's Swagger 2 habit; OpenAPI 3 says it in ``content``
            operation.setdefault("responses", {}).setdefault("default", _ERROR)
            use_case = operation.pop(USE_CASE, None)
            if use_case is None:
                continue
            names = sorted({name for cfg in configs.values() if use_case in usecases(cfg)
                            for name in (cfg.name, *cfg.aliases)})
            body = operation.get("requestBody", {}).get("content", {})
            for media in body.values():
                _restrict_model(media, names)


def _restrict_model(media: dict[str, Any], names: list[str]) -> None:
    model: dict[str, Any] = {"type": "string", "description": "A configured model that serves this route"}
    if names:
        model["enum"] = names
    media["schema"] = {"allOf": [media["schema"], {"type": "object", "properties": {"model": model}}]}
