"""POST /v1/completions (and LocalAI's /completions): raw prompts, ``echo``, ``suffix``, ``logprobs``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from localai_aio.api.chat_jobs import sampling_defaults
from localai_aio.api.common import json_route, new_id, now, registry, resolve_model
from localai_aio.api.sampling import parse_n, parse_params
from localai_aio.api.text_jobs import TextJob, serve_text, stream_options
from localai_aio.backends.text import TextEngine
from localai_aio.errors import InvalidRequest
from localai_aio.server import keys
from localai_aio.server.openapi import answers
from localai_aio.text.choices import TokenLogprob
from localai_aio.text.engine_fit import tokenize_prompt
from localai_aio.text.prompts import fill_in_middle, render_completion
from localai_aio.text.tools import plan_tools

routes = web.RouteTableDef()
MAX_LOGPROBS = 5
MAX_PROMPTS = 64

class CompletionFormat:
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self) -> None:
        self._sent: dict[int, int] = {}  # characters of each choice streamed so far: text_offset counts from its start

    @staticmethod
    def _logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
        if entries is None:
            return None
        offsets, pos = [], offset
        for e in entries:
            offsets.append(pos)
            pos += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e.top_logprobs} for e in entries],
                "text_offset": offsets}

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish_reason: str) -> dict:
        return {"text": text, "index": index, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

    def first_chunks(self, indexes: Sequence[int]) -> list[dict]:
        return []

    def chunks(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[dict]:
        start = self._sent.get(index, 0)
        self._sent[index] = start + len(text)
        return [{"text": text, "index": index, "logprobs": self._logprobs(logprobs, start), "finish_reason": None}]

    def finish_chunks(self, index: int, finish_reason: str) -> list[dict]:
        return [{"text": "", "index": index, "logprobs": None, "finish_reason": finish_reason}]


def _prompts(value: Any) -> list[str | list[int]]:
    """``prompt`` as a string, a list of strings, a token list or a list of token lists."""
    def is_tokens(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str):
        prompts: list[str | list[int]] = [value]
    elif is_tokens(value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) or is_tokens(v) for v in value):
        prompts = list(value)
    else:
        raise InvalidRequest("Invalid value for 'prompt': must be a string, a list of strings, a list of token "
                             "ids or a list of token-id lists (non-empty)", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequest(f"Invalid value for 'prompt': at most {MAX_PROMPTS} prompts", param="prompt")
    return prompts


def _logprobs(body: dict[str, Any]) -> int | None:
    value = body.get("logprobs")
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise InvalidRequest(f"Invalid value for 'logprobs': must be an integer from 0 to {MAX_LOGPROBS}",
                             param="logprobs")
    return value


def build_completion_job(request: web.Request, body: dict[str, Any]) -> TextJob:
    cfg = resolve_model(request, body.get("model"), "completion")
    prompts = _prompts(body.get("prompt"))
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise InvalidRequest("Invalid value for 'suffix': must be a string", param="suffix")
    echo = body.get("echo", False)  # a boolean: the route's schema checks it
    if body.get("best_of") not in (None, 1):
        raise InvalidRequest("'best_of' other than 1 is not supported", param="best_of")
    logprobs = _logprobs(body)
    plan = plan_tools({"grammar": body.get("grammar"), "response_format": body.get("response_format")}, {})
    params = parse_params(body, sampling_defaults(cfg), stopwords=cfg.stopwords, logprobs=logprobs,
                          grammar=plan.grammar, grammar_param=plan.grammar_param,
                          cache_scope=request[keys.PRINCIPAL].cache_scope)

    echo_texts: list[str] = []

    def build(engine: TextEngine) -> list[list[int]]:
        out = []
        echo_texts.clear()
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, list):
                bad = [t for t in prompt if not 0 <= t < engine.n_vocab]
                if bad:
                    raise InvalidRequest(f"Invalid value for 'prompt': token id {bad[0]} is outside the model's "
                                         f"vocabulary of {engine.n_vocab}", param=f"prompt.{i}")
                out.append(list(prompt))
            elif suffix:
                out.append(fill_in_middle(engine, prompt, suffix))
            else:
                out.append(tokenize_prompt(engine, render_completion(cfg.template, prompt), add_bos=True, special=True))
            if echo:
                echo_texts.append(prompt if isinstance(prompt, str)
                                  else b"".join(engine.token_bytes(t) for t in prompt).decode("utf-8", "replace"))
        return out

    return TextJob(cfg=cfg, backend=registry(request).backend_name(cfg) or "", build_prompts=build,
                   params=params, n=parse_n(body), stream=bool(body.get("stream")),
                   include_usage=stream_options(body), want_logprobs=logprobs is not None,
                   prefix_texts=echo_texts)


@routes.post("/v1/completions")
@routes.post("/completions")
@json_route("post", "/v1/completions", "completions", use_case="completion",
            responses=answers("Completion", stream=True))
async def completions(request: web.Request) -> web.StreamResponse:
    job = build_completion_job(request, request[keys.BODY])
    return await serve_text(request, job, CompletionFormat(), new_id("cmpl"), now())
