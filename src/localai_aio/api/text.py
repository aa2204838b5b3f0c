"""Serving text generation for chat and completions: hold an engine instance, run the choices in a
worker thread, and answer as one JSON body or as an SSE stream.

Chat and completions differ only in how a prompt is built and how a piece of text is shaped in the
response; they pass those in as a ``TextFormat``. Everything else (engine acquisition, the worker,
cancellation on disconnect, usage, metrics, mid-stream errors) is here once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from localai_aio import keys
from localai_aio.config import ModelConfig
from localai_aio.errors import APIError, InternalError
from localai_aio.generation import (
    Finish,
    GenParams,
    Piece,
    TextEngine,
    TokenLogprob,
    check_capabilities,
    check_prompt_fits,
    generate_choice,
)
from localai_aio.runtime import CancelFlag, iterate_in_thread, run_blocking
from localai_aio.sse import EventStream

log = logging.getLogger(__name__)


class TextFormat(Protocol):
    """How one API family shapes its responses."""

    object_name: str
    chunk_object_name: str

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish_reason: str) -> dict: ...

    def first_chunks(self, indexes: Sequence[int]) -> list[dict]: ...

    def chunks(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[dict]: ...

    def finish_chunks(self, index: int, finish_reason: str) -> list[dict]: ...


@dataclass
class TextJob:
    """A validated request: how to build its prompts on an engine, and how to sample."""

    cfg: ModelConfig
    backend: str
    build_prompts: Callable[[TextEngine], list[list[int]]]
    params: GenParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    want_logprobs: bool = False
    prefix_texts: list[str] = field(default_factory=list)  # completions' echo: text before each prompt's choices


def _prepare(engine: TextEngine, job: TextJob) -> list[list[int]]:
    check_capabilities(engine, job.params, job.backend)
    prompts = job.build_prompts(engine)
    for prompt in prompts:
        check_prompt_fits(engine, prompt)
    return prompts


def _generate_all(engine: TextEngine, prompts: list[list[int]], job: TextJob, cancel: CancelFlag):  # noqa: ANN202
    for p, prompt in enumerate(prompts):
        for i in range(job.n):
            if cancel.is_set():
                return
            yield from generate_choice(engine, prompt, job.params.for_choice(i), p * job.n + i, cancel)


async def serve_text(request: web.Request, job: TextJob, fmt: TextFormat, response_id: str,
                     created: int) -> web.StreamResponse:
    app = request.app
    executor = app[keys.EXECUTOR]
    metrics = app[keys.METRICS]
    model_name = request["data"].get("model") or job.cfg.name
    envelope = {"id": response_id, "object": fmt.chunk_object_name, "created": created, "model": model_name}
    started = time.perf_counter()
    completion_tokens = 0
    async with app[keys.REGISTRY].acquire(job.cfg.name) as engine:
        prompts = await run_blocking(executor, _prepare, engine, job)
        prompt_tokens = sum(len(p) for p in prompts)
        indexes = list(range(len(prompts) * job.n))
        events = iterate_in_thread(executor, lambda cancel: _generate_all(engine, prompts, job, cancel))
        try:
            if job.stream:
                stream = EventStream(request)
                try:
                    for chunk in fmt.first_chunks(indexes):
                        await stream.send(_with(envelope, chunk, job))
                    for index, text in enumerate(job.prefix_texts):
                        for i in range(job.n):
                            if text:
                                for chunk in fmt.chunks(index * job.n + i, text, None):
                                    await stream.send(_with(envelope, chunk, job))
                    async for event in events:
                        if isinstance(event, Piece):
                            chunks = fmt.chunks(event.index, event.text,
                                                event.logprobs if job.want_logprobs else None)
                        else:
                            completion_tokens += event.completion_tokens
                            chunks = fmt.finish_chunks(event.index, event.reason)
                        for chunk in chunks:
                            await stream.send(_with(envelope, chunk, job))
                    if job.include_usage:
                        await stream.send({**envelope, "choices": [],
                                           "usage": _usage(prompt_tokens, completion_tokens)})
                    return await stream.done()
                except (ConnectionResetError, asyncio.CancelledError):
                    log.info("client left during a stream of %s; generation stopped", job.cfg.name)
                    raise
                except Exception as exc:
                    if not stream.started:
                        raise
                    err = exc if isinstance(exc, APIError) else InternalError("Generation failed")
                    if not isinstance(exc, APIError):
                        log.exception("generation failed mid-stream (request id %s)", request.get(keys.REQUEST_ID))
                    return await stream.fail(err.body())
            texts: dict[int, list[str]] = {i: [] for i in indexes}
            logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in indexes}
            reasons: dict[int, str] = {}
            async for event in events:
                if isinstance(event, Piece):
                    texts[event.index].append(event.text)
                    logprobs[event.index].extend(event.logprobs)
                elif isinstance(event, Finish):
                    reasons[event.index] = event.reason
                    completion_tokens += event.completion_tokens
        finally:
            await events.aclose()
            metrics.inference.labels(job.cfg.name, fmt.object_name).observe(time.perf_counter() - started)
            metrics.tokens.labels(job.cfg.name).inc(completion_tokens)
    choices = []
    for i in indexes:
        prefix = job.prefix_texts[i // job.n] if job.prefix_texts else ""
        choices.append(fmt.choice(i, prefix + "".join(texts[i]), logprobs[i] if job.want_logprobs else None,
                                  reasons.get(i, "stop")))
    body = {"id": response_id, "object": fmt.object_name, "created": created, "model": model_name,
            "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}
    return web.json_response(body)


def _with(envelope: dict[str, Any], choice: dict[str, Any], job: TextJob) -> dict[str, Any]:
    out = {**envelope, "choices": [choice]}
    if job.include_usage:
        out["usage"] = None
    return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def stream_options(body: dict[str, Any]) -> bool:
    """``stream_options.include_usage``; only meaningful with ``stream: true``."""
    from localai_aio.errors import InvalidRequest

    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise InvalidRequest("Invalid value for 'stream_options': expected {\"include_usage\": bool}",
                             param="stream_options")
    if not body.get("stream"):
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return bool(options.get("include_usage", False))
