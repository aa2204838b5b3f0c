"""POST /v1/chat/completions (and LocalAI's /chat/completions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from localai_aio.api.common import json_route, new_id, now, registry, resolve_model
from localai_aio.api.text import TextJob, serve_text, stream_options
from localai_aio.errors import InvalidRequest
from localai_aio.generation import TextEngine, TokenLogprob, parse_n, parse_params
from localai_aio.prompts import chat_template_source, normalize_messages, render_chat

routes = web.RouteTableDef()
MAX_TOP_LOGPROBS = 20


class ChatFormat:
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    @staticmethod
    def _logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                             "top_logprobs": e.top_logprobs} for e in entries]}

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish_reason: str) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

    def first_chunks(self, indexes: Sequence[int]) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in indexes]

    def chunk(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> dict:
        return {"index": index, "delta": {"content": text}, "logprobs": self._logprobs(logprobs),
                "finish_reason": None}

    def finish_chunk(self, index: int, finish_reason: str) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}


def chat_logprobs(body: dict[str, Any]) -> int | None:
    wanted = body.get("logprobs")
    top = body.get("top_logprobs")
    if wanted not in (None, True, False):
        raise InvalidRequest("Invalid value for 'logprobs': must be a boolean", param="logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"Invalid value for 'top_logprobs': must be an integer from 0 to "
                                 f"{MAX_TOP_LOGPROBS}", param="top_logprobs")
        if not wanted:
            raise InvalidRequest("'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def build_chat_job(request: web.Request, body: dict[str, Any]) -> TextJob:
    cfg = resolve_model(request, body.get("model"), "chat")
    reg = registry(request)
    messages = normalize_messages(body.get("messages"), cfg.system_prompt)
    logprobs = chat_logprobs(body)
    params = parse_params(body, cfg.parameters, stopwords=cfg.stopwords, logprobs=logprobs)

    def build(engine: TextEngine) -> list[list[int]]:
        info = engine.info
        source = chat_template_source(cfg.template, info.chat_template, cfg.name)
        text = render_chat(source, messages, bos_token=info.token_text(info.bos_id),
                           eos_token=info.token_text(info.eos_id))
        ids = engine.tokenize(text, add_bos=False, special=True)
        if info.add_bos and info.bos_id is not None and (not ids or ids[0] != info.bos_id):
            ids.insert(0, info.bos_id)
        return [ids]

    return TextJob(cfg=cfg, backend=reg.backend_name(cfg) or "", build_prompts=build, params=params,
                   n=parse_n(body), stream=bool(body.get("stream")), include_usage=stream_options(body),
                   want_logprobs=logprobs is not None)


@routes.post("/v1/chat/completions")
@routes.post("/chat/completions")
@json_route("post", "/v1/chat/completions", "chat")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    job = build_chat_job(request, request["data"])
    return await serve_text(request, job, ChatFormat(), new_id("chatcmpl"), now())

