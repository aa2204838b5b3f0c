"""Assistants (LocalAI's v1 assistants API): create, list, read, modify, delete, and attached files."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs

from localai_aio.api.common import json_route, registry
from localai_aio.api.stored import call_store, list_body, list_params
from localai_aio.errors import InvalidRequest
from localai_aio.server import keys
from localai_aio.server.openapi import answers
from localai_aio.server.schemas import definition_schema
from localai_aio.text.tools import check_schema

routes = web.RouteTableDef()

LIMITS = {"name": 256, "description": 512, "instructions": 256_000}
MAX_TOOLS = 128
MAX_FILES = 20
MAX_METADATA = 16
TOOL_TYPES = ("code_interpreter", "retrieval", "file_search", "function")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def validate_assistant(request: web.Request, body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """OpenAI's limits; returns the fields to store."""
    fields: dict[str, Any] = {}
    if "model" in body or not partial:
        model = body.get("model")  # a string when present: the route's schema checks it
        if not model:
            raise InvalidRequest("'model' is required", param="model")
        registry(request).config(model)  # 404 model_not_found for a model this server does not have
        fields["model"] = model
    for key, limit in LIMITS.items():  # strings, never null: the route's schema checks their type
        if key in body:
            value = body[key]
            if len(value) > limit:
                raise InvalidRequest(f"'{key}' is too long: {len(value)} characters, at most {limit}", param=key)
            fields[key] = value
    if "tools" in body:
        fields["tools"] = _validate_tools(body["tools"] or [])
    if "metadata" in body:
        fields["metadata"] = _validate_metadata(body["metadata"] or {})
    if "file_ids" in body:
        file_ids = body["file_ids"] or []
        if len(file_ids) > MAX_FILES:
            raise InvalidRequest(f"'file_ids' has {len(file_ids)} files, at most {MAX_FILES}", param="file_ids")
        fields["file_ids"] = file_ids
    return fields


def _validate_tools(tools: list[Any]) -> list[dict[str, Any]]:
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"'tools' has {len(tools)} tools, at most {MAX_TOOLS}", param="tools")
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if "type" not in tool:  # its value is one of the spec's tool types: the route's schema checks it
            raise InvalidRequest(f"Invalid value for '{where}.type': must be one of {', '.join(TOOL_TYPES)}",
                                 param=f"{where}.type")
        if tool["type"] == "function":
            fn = tool.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not FUNCTION_NAME.match(fn["name"]):
                raise InvalidRequest(f"Invalid value for '{where}.function': a function needs a 'name' of 1-64 "
                                     "letters, digits, '_' or '-'", param=f"{where}.function")
            if "description" in fn and not isinstance(fn["description"], str):
                raise InvalidRequest(f"Invalid value for '{where}.function.description': must be a string",
                                     param=f"{where}.function.description")
            if "parameters" in fn:
                check_schema(fn["parameters"], f"{where}.function.parameters")
    return tools


def _validate_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA:
        raise InvalidRequest(f"'metadata' has {len(metadata)} pairs, at most {MAX_METADATA}", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64:
            raise InvalidRequest(f"metadata key '{key[:20]}...' is longer than 64 characters", param="metadata")
        if len(value) > 512:
            raise InvalidRequest(f"metadata value of '{key}' is longer than 512 characters", param="metadata")
    return metadata


@routes.post("/v1/assistants")
@json_route("post", "/v1/assistants", "assistants", use_case="chat", responses=answers("Assistant"))
async def create_assistant(request: web.Request) -> web.Response:
    fields = validate_assistant(request, request[keys.BODY], partial=False)
    return web.json_response(await call_store(request, "create_assistant", fields))


@routes.get("/v1/assistants")
@docs(tags=["assistants"], summary="List assistants (limit, order, after, before).",
      responses=answers("AssistantList"))
async def list_assistants(request: web.Request) -> web.Response:
    return web.json_response(list_body(await call_store(request, "list_assistants", **list_params(request))))


@routes.get("/v1/assistants/{assistant_id}")
@docs(tags=["assistants"], summary="Retrieve an assistant.", responses=answers("Assistant"))
async def get_assistant(request: web.Request) -> web.Response:
    return web.json_response(await call_store(request, "get_assistant", request.match_info["assistant_id"]))


@routes.post("/v1/assistants/{assistant_id}")
@json_route("post", None, "assistants", schema=definition_schema("openai.AssistantRequest"),
            summary="Modify an assistant.", use_case="chat", responses=answers("Assistant"))
async def modify_assistant(request: web.Request) -> web.Response:
    fields = validate_assistant(request, request[keys.BODY], partial=True)
    return web.json_response(await call_store(request, "update_assistant", request.match_info["assistant_id"],
                                              fields))


@routes.delete("/v1/assistants/{assistant_id}")
@docs(tags=["assistants"], summary="Delete an assistant (and its file links).", responses=answers("Deleted"))
async def delete_assistant(request: web.Request) -> web.Response:
    assistant_id = request.match_info["assistant_id"]
    await call_store(request, "delete_assistant", assistant_id)
    return web.json_response({"id": assistant_id, "object": "assistant.deleted", "deleted": True})


@routes.post("/v1/assistants/{assistant_id}/files")
@json_route("post", None, "assistants", schema=definition_schema("localai.AssistantFileRequest"),
            summary="Attach a file to an assistant.", responses=answers("AssistantFile"))
async def attach_file(request: web.Request) -> web.Response:
    assistant_id = request.match_info["assistant_id"]
    count = len((await call_store(request, "get_assistant", assistant_id))["file_ids"])
    if count >= MAX_FILES:
        raise InvalidRequest(f"An assistant can have at most {MAX_FILES} files", param="file_id")
    return web.json_response(await call_store(request, "attach_file", assistant_id, request[keys.BODY]["file_id"]))


@routes.get("/v1/assistants/{assistant_id}/files")
@docs(tags=["assistants"], summary="List an assistant's files.", responses=answers("AssistantFileList"))
async def list_assistant_files(request: web.Request) -> web.Response:
    page = await call_store(request, "list_assistant_files", request.match_info["assistant_id"],
                            **list_params(request))
    return web.json_response(list_body(page))


@routes.get("/v1/assistants/{assistant_id}/files/{file_id}")
@docs(tags=["assistants"], summary="Retrieve an assistant's file link.", responses=answers("AssistantFile"))
async def get_assistant_file(request: web.Request) -> web.Response:
    return web.json_response(await call_store(request, "get_assistant_file", request.match_info["assistant_id"],
                                              request.match_info["file_id"]))


@routes.delete("/v1/assistants/{assistant_id}/files/{file_id}")
@docs(tags=["assistants"], summary="Detach a file from an assistant.", responses=answers("Deleted"))
async def detach_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    await call_store(request, "detach_file", request.match_info["assistant_id"], file_id)
    return web.json_response({"id": file_id, "object": "assistant.file.deleted", "deleted": True})
