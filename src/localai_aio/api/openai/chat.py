"""POST /v1/chat/completions (and LocalAI's /chat/completions), with tools and structured output."""

from __future__ import annotations

from aiohttp import web

from localai_aio.api.chat_jobs import ChatFormat, chat_job
from localai_aio.api.common import json_route, new_id, now
from localai_aio.api.text_jobs import serve_text
from localai_aio.server import keys
from localai_aio.server.openapi import answers

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
@routes.post("/chat/completions")
@json_route("post", "/v1/chat/completions", "chat", use_case="chat", responses=answers("ChatCompletion", stream=True))
async def chat_completions(request: web.Request) -> web.StreamResponse:
    job, plan = await chat_job(request, request[keys.BODY])
    return await serve_text(request, job, ChatFormat(plan, job), new_id("chatcmpl"), now())
