"""Serving text generation for chat and completions: hold an engine, hand it the choices, and answer
as one JSON body or as an SSE stream while the engine's thread produces tokens.

Chat and completions differ only in how a prompt is built and how a piece of text is shaped in the
response; they pass those in as a ``TextFormat``. Everything else (engine acquisition, the worker,
cancellation on disconnect, usage, metrics, mid-stream errors) is here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from localai_aio import __version__
from localai_aio.backends.text import GenParams, SeqEnd, TextEngine, TokenStream
from localai_aio.config import ModelConfig
from localai_aio.registry import EngineHandle
from localai_aio.runtime import produced
from localai_aio.server import keys
from localai_aio.server.sse import EventStream, ending
from localai_aio.text.choices import ChoiceText, Finish, Piece, TokenLogprob
from localai_aio.text.engine_fit import check_capabilities, check_prompt_fits
from localai_aio.text.reasoning import Markers
from localai_aio.text.tool_formats import GENERIC, ToolFormat

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
    reasoning: Markers | None = None  # chat: where reasoning text starts and ends (None: no splitting)
    opens_reasoning: bool = False  # set when the prompt is built: its generation prompt opens the reasoning
    tool_format: ToolFormat = GENERIC  # chat with tools: set when the prompt is built, from the template


def _prepare(engine: TextEngine, job: TextJob) -> list[list[int]]:
    prompts = job.build_prompts(engine)  # first: a chat prompt decides the tool format, and so the grammar
    check_capabilities(engine, job.params, job.backend)
    for prompt in prompts:
        check_prompt_fits(engine, prompt)
    return prompts


def _start(engine: TextEngine, prompt: list[int], params: list[GenParams], stream: TokenStream) -> None:
    """On the engine's thread: hand the choices to the engine; an error reaches the stream's reader."""
    try:
        engine.start(prompt, params, stream)
    except BaseException as exc:
        stream.fail(exc)


async def _events(handle: EngineHandle, prompts: list[list[int]], job: TextJob,
                  cached: list[int]) -> AsyncIterator[Piece | Finish]:
    """Every choice of every prompt, as text events in the order the engine produces them.

    A batching engine runs the prompts' choices together; a sequential one runs them in order on its
    thread. When the consumer leaves, the streams are cancelled and the engine drops them within one
    step; a sequential engine's work is awaited so its instance is idle before it is handed back.
    """
    choices = [job.params.for_choice(i) for i in range(job.n)]
    streams = [TokenStream(job.n) for _ in prompts]
    texts = [[ChoiceText(p * job.n + i, choices[i]) for i in range(job.n)] for p in range(len(prompts))]
    works = [handle.thread.submit(_start, handle.engine, prompt, choices, stream)
             for prompt, stream in zip(prompts, streams, strict=True)]
    try:
        for p, stream in enumerate(streams):  # prompts one after another; a prompt's choices interleave
            open_choices = job.n
            while open_choices:
                index, item = await stream.get()
                text = texts[p][index]
                if text.done:
                    continue
                if isinstance(item, SeqEnd):
                    events = text.end(item)
                    if index == 0:
                        cached[p] = item.cached_tokens
                else:
                    events = text.feed(item)
                    if text.done:
                        stream.finish(index)  # a stop string: the engine drops the choice
                for event in events:
                    yield event
                open_choices -= text.done
    finally:
        for stream in streams:
            stream.cancel()
        for work in works:
            await asyncio.shield(asyncio.wrap_future(work))


@dataclass
class Prepared:
    """What the generation side hands the response side once the prompts are built."""

    prompt_tokens: int
    indexes: list[int]
    cached: list[int]


async def _generate(app: web.Application, job: TextJob, task: str, put: Callable[[Any], None]) -> None:
    """Hold the model only while generating: ``put`` a ``Prepared``, then every event. The response is
    written from these at the client's pace (``runtime.produced``), so a client that reads slowly never
    holds the model for anyone else."""
    metrics = app[keys.METRICS]
    started = time.perf_counter()
    async with app[keys.REGISTRY].acquire(job.cfg.name) as handle:
        prompts = await handle.read(_prepare, handle.engine, job)
        prepared = Prepared(sum(len(p) for p in prompts), list(range(len(prompts) * job.n)), [0] * len(prompts))
        put(prepared)
        events = _events(handle, prompts, job, prepared.cached)
        try:
            async for event in events:
                if isinstance(event, Finish):
                    metrics.tokens.labels(job.cfg.name).inc(event.completion_tokens)
                put(event)
        finally:
            await events.aclose()
            metrics.inference.labels(job.cfg.name, task).observe(time.perf_counter() - started)


@contextlib.asynccontextmanager
async def generation(app: web.Application, job: TextJob, task: str
                     ) -> AsyncIterator[tuple[Prepared, AsyncIterator[Piece | Finish]]]:
    """Generate ``job``: what was prepared (prompt tokens), then its text events, for any protocol to
    shape. Errors before the first token leave the ``async with`` as they are (a plain error answer);
    leaving the block stops the generation and frees the model."""
    async with contextlib.aclosing(produced(functools.partial(_generate, app, job, task))) as events:
        prepared = await anext(events)
        yield prepared, events  # type: ignore[misc]


def fingerprint(cfg: ModelConfig) -> str:
    """OpenAI's ``system_fingerprint``: it changes when what answers changes (this server's version, the
    model's file or its configuration), so clients can tell when the same seed may answer differently."""
    source = f"{__version__}|{cfg.name}|{cfg.model_path}|{sorted(cfg.parameters.items())}|{cfg.backend}"
    return "fp_" + hashlib.sha256(source.encode()).hexdigest()[:10]


async def prompt_fit(app: web.Application, job: TextJob) -> tuple[int, int]:
    """How many tokens ``job``'s prompts are, and the model's context: built with the model's own template
    and tokenizer, exactly as a generation builds them, without generating."""
    def measure(engine: TextEngine) -> tuple[int, int]:
        return sum(len(p) for p in job.build_prompts(engine)), engine.n_ctx

    return await app[keys.REGISTRY].read(job.cfg.name, measure)


async def prompt_tokens(app: web.Application, job: TextJob) -> int:
    return (await prompt_fit(app, job))[0]


async def serve_text(request: web.Request, job: TextJob, fmt: TextFormat, response_id: str,
                     created: int) -> web.StreamResponse:
    app = request.app
    model_name = request[keys.BODY].get("model") or job.cfg.name
    envelope = {"id": response_id, "object": fmt.chunk_object_name, "created": created, "model": model_name,
                "system_fingerprint": fingerprint(job.cfg)}
    completion_tokens = 0
    async with generation(app, job, fmt.object_name) as (prepared, events):
        indexes = prepared.indexes
        if job.stream:
            stream = EventStream(request, app[keys.SETTINGS].write_timeout)
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
                                       "usage": _usage(prepared.prompt_tokens, completion_tokens,
                                                       sum(prepared.cached))})
                return await stream.done()
            except (Exception, asyncio.CancelledError) as exc:
                error = ending(stream, exc, f"a stream of {job.cfg.name}")
                return stream.response if error is None else await stream.fail(error.body())
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
    choices = []
    for i in indexes:
        prefix = job.prefix_texts[i // job.n] if job.prefix_texts else ""
        choices.append(fmt.choice(i, prefix + "".join(texts[i]), logprobs[i] if job.want_logprobs else None,
                                  reasons.get(i, "stop")))
    body = {"id": response_id, "object": fmt.object_name, "created": created, "model": model_name,
            "system_fingerprint": envelope["system_fingerprint"],
            "choices": choices, "usage": _usage(prepared.prompt_tokens, completion_tokens, sum(prepared.cached))}
    return web.json_response(body)


def _with(envelope: dict[str, Any], choice: dict[str, Any], job: TextJob) -> dict[str, Any]:
    out = {**envelope, "choices": [choice]}
    if job.include_usage:
        out["usage"] = None
    return out


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


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
