"""Ollama's ``POST /api/chat`` and ``POST /api/generate``.

Both are translated into a chat request and run by the chat code (``chat_job``, ``turn_events``), so
templates, tools, ``format`` grammars, stop strings, reasoning and the checks of every sampling field are
the chat's own; only the shapes are Ollama's. ``generate`` is a one-message chat (Ollama applies the
model's template too) unless ``raw``, which continues the prompt as written. Answers stream as NDJSON
unless ``"stream": false``; the last object says ``done`` with the counts and durations (nanoseconds).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from localai_aio.api.chat_jobs import (
    ArgumentsDelta,
    CallStart,
    TextDelta,
    ThinkingDelta,
    TurnEnd,
    chat_job,
    sampling_defaults,
)
from localai_aio.api.chat_jobs import turn_events as chat_turn
from localai_aio.api.common import json_route, registry
from localai_aio.api.ollama.shared import (
    Clock,
    after,
    created_at,
    model_config,
    sampling_fields,
    stream_lines,
    unloads,
)
from localai_aio.api.sampling import parse_params
from localai_aio.api.text_jobs import Prepared, TextJob
from localai_aio.backends.text import TextEngine
from localai_aio.config import ModelConfig
from localai_aio.errors import InvalidRequest
from localai_aio.server import keys
from localai_aio.server.schemas import definition_schema
from localai_aio.text.engine_fit import tokenize_prompt
from localai_aio.text.prompts import fill_in_middle
from localai_aio.text.tools import ToolPlan, plan_tools

routes = web.RouteTableDef()

THINK_LEVELS = ("low", "medium", "high")


# -- request: Ollama's fields -> a chat request --------------------------------------------------------------

def _format(value: Any) -> dict[str, Any] | None:
    """``format`` as chat's ``response_format``: "json" any JSON object, a schema that schema."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value, "strict": True}}
    raise InvalidRequest(f"invalid format: {value!r}; expected \"json\" or a JSON schema", param="format")


def _think(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if value in THINK_LEVELS:
        return True
    raise InvalidRequest(f"invalid think value: {value!r} (true, false, \"low\", \"medium\" or \"high\")",
                         param="think")


def _arguments(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f"Invalid value for '{where}': a tool call is {{\"function\": {{\"name\", "
                             "\"arguments\"}}}", param=where)
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):  # some clients send OpenAI's JSON text
        return {"name": function["name"], "arguments": arguments}
    return {"name": function["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's messages as chat's: calls get ids, and a tool's answer the id of the call it answers (by
    ``tool_name``, else in order)."""
    out: list[dict[str, Any]] = []
    waiting: list[tuple[str, str]] = []  # (id, name) of the last assistant's calls not answered yet
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if message.get("images"):
            raise InvalidRequest(f"'{where}.images': this server's chat models take no images", param=f"{where}.images")
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [{"id": f"call_{i}_{n}", "type": "function",
                      "function": _arguments(call, f"{where}.tool_calls.{n}")}
                     for n, call in enumerate(message["tool_calls"])]
            waiting = [(call["id"], call["function"]["name"]) for call in calls]
            out.append({"role": "assistant", "content": content, "tool_calls": calls})
        elif role == "tool":
            name = message.get("tool_name") or message.get("name")
            match = next((entry for entry in waiting if entry[1] == name), waiting[0] if waiting else None)
            if match is None:
                raise InvalidRequest(f"'{where}': a tool message answers a tool call of an earlier assistant "
                                     "message, and there is none left to answer", param=where)
            waiting.remove(match)
            out.append({"role": "tool", "tool_call_id": match[0], "name": match[1], "content": content})
        else:
            out.append({"role": role, "content": content})
    return out


def chat_body(cfg: ModelConfig, body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat-completions request that asks for what this Ollama request asks."""
    if body.get("options") is not None and not isinstance(body["options"], dict):
        raise InvalidRequest("options must be an object", param="options")
    chat = {**sampling_fields(body.get("options")), "model": cfg.name, "messages": messages}
    response_format = _format(body.get("format"))
    if response_format is not None:
        chat["response_format"] = response_format
    if body.get("tools"):
        chat["tools"] = body["tools"]
    return chat


# -- answer: a turn's events -> Ollama's chunks -----------------------------------------------------------------

class Reply:
    """Builds the answer from a turn's events and says each step as Ollama's chunks, so a streamed
    answer and a plain one are the same by construction. ``field`` is "message" (chat) or "response"."""

    def __init__(self, model: str, field: str, think: bool | None, clock: Clock):
        self.model, self.field, self.think, self.clock = model, field, think, clock
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self._arguments: list[str] = []
        self.prompt_tokens = self.completion_tokens = 0
        self.reason = "stop"

    def _chunk(self, content: str, **extra: Any) -> dict[str, Any]:
        if self.field == "message":
            return {"model": self.model, "created_at": created_at(),
                    "message": {"role": "assistant", "content": content, **extra}, "done": False}
        return {"model": self.model, "created_at": created_at(), "response": content, **extra, "done": False}

    def step(self, event: Prepared | Any) -> list[dict[str, Any]]:
        if isinstance(event, Prepared):
            self.clock.mark_prepared()
            self.prompt_tokens = event.prompt_tokens
            return []
        self.clock.mark_piece()
        if isinstance(event, TextDelta):
            self.text.append(event.text)
            return [self._chunk(event.text)]
        if isinstance(event, ThinkingDelta):
            if self.think is False:
                return []
            self.thinking.append(event.text)
            return [self._chunk("", thinking=event.text)]
        if isinstance(event, CallStart):
            self.calls.append({"function": {"name": event.name, "arguments": {}}})
            self._arguments.append("")
            return []
        if isinstance(event, ArgumentsDelta):
            self._arguments[-1] += event.text
            return []
        assert isinstance(event, TurnEnd)
        self.clock.mark_end()
        self.completion_tokens = event.completion_tokens
        self.reason = "length" if event.reason == "length" else "stop"
        for call, arguments in zip(self.calls, self._arguments, strict=True):
            call["function"]["arguments"] = json.loads(arguments or "{}")
        return [self._chunk("", tool_calls=self.calls)] if self.calls else []

    def last(self, whole: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``done`` object: the whole answer (``whole``), or the stream's last line."""
        content = "".join(self.text) if whole else ""
        shaped: dict[str, Any] = {}
        if whole and self.thinking:
            shaped["thinking"] = "".join(self.thinking)
        if whole and self.calls:
            shaped["tool_calls"] = self.calls
        out = self._chunk(content, **shaped)
        out.update({"done": True, "done_reason": self.reason, **(extra or {}),
                    **self.clock.figures(self.prompt_tokens, self.completion_tokens)})
        return out


async def _answer(request: web.Request, cfg: ModelConfig, job: TextJob, plan: ToolPlan, reply: Reply,
                  stream: bool, finish: Any = None) -> web.StreamResponse:
    """Run the turn and answer it; ``finish(reply)`` adds fields to the last object (generate's context)."""
    body = request[keys.BODY]
    await reply.clock.load_model(request, cfg)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        async with contextlib.aclosing(chat_turn(request.app, job, plan, "ollama", thinking=True)) as events:
            async for event in events:
                for chunk in reply.step(event):
                    if stream:
                        yield chunk
        extra = await finish(reply) if finish is not None else None
        await after(request, cfg, body.get("keep_alive"))
        yield reply.last(not stream, extra)

    if stream:
        return await stream_lines(request, chunks(), f"an Ollama answer of {cfg.name}")
    last: dict[str, Any] = {}
    async for chunk in chunks():
        last = chunk
    return web.json_response(last)


async def _load_only(request: web.Request, cfg: ModelConfig, field: str) -> web.Response:
    """No messages (no prompt): load the model, or with ``keep_alive: 0`` unload it."""
    if unloads(request[keys.BODY].get("keep_alive")):
        await registry(request).unload(cfg.name)
        reason = "unload"
    else:
        await Clock().load_model(request, cfg)
        reason = "load"
    content: dict[str, Any] = ({"message": {"role": "assistant", "content": ""}} if field == "message"
                               else {"response": ""})
    return web.json_response({"model": request[keys.BODY]["model"], "created_at": created_at(), **content,
                              "done_reason": reason, "done": True})


def _check_think(job: TextJob, think: bool | None, name: str) -> None:
    if think and job.reasoning is None:
        raise InvalidRequest(f'"{name}" does not support thinking', param="think")


@routes.post("/api/chat")
@json_route("post", None, "ollama", schema=definition_schema("ollama.ChatRequest"), use_case="chat",
            summary="Chat (Ollama's API): NDJSON chunks unless \"stream\": false")
async def chat(request: web.Request) -> web.StreamResponse:
    body = request[keys.BODY]
    clock = Clock()
    cfg = model_config(request, body["model"], "chat")
    think = _think(body.get("think"))
    if not body.get("messages"):
        return await _load_only(request, cfg, "message")
    job, plan = await chat_job(request, chat_body(cfg, body, chat_messages(body["messages"])))
    _check_think(job, think, body["model"])
    reply = Reply(body["model"], "message", think, clock)
    return await _answer(request, cfg, job, plan, reply, body.get("stream", True) is not False)


def _raw_job(request: web.Request, cfg: ModelConfig, body: dict[str, Any]) -> tuple[TextJob, ToolPlan]:
    """``raw`` (or ``suffix``): the prompt continued as written, or filled in between prompt and suffix."""
    chat = chat_body(cfg, body, [])
    plan = plan_tools({"response_format": chat.get("response_format")}, {})
    params = parse_params(chat, sampling_defaults(cfg), stopwords=cfg.stopwords, grammar=plan.grammar,
                          grammar_param=plan.grammar_param, cache_scope=request[keys.PRINCIPAL].cache_scope)
    prompt, suffix = body.get("prompt") or "", body.get("suffix")

    def build(engine: TextEngine) -> list[list[int]]:
        if suffix:
            return [fill_in_middle(engine, prompt, suffix)]
        return [tokenize_prompt(engine, prompt, add_bos=True, special=True)]

    return TextJob(cfg=cfg, backend=registry(request).backend_name(cfg) or "", build_prompts=build,
                   params=params), plan


@routes.post("/api/generate")
@json_route("post", None, "ollama", schema=definition_schema("ollama.GenerateRequest"), use_case="chat",
            summary="Generate a completion (Ollama's API): NDJSON chunks unless \"stream\": false")
async def generate(request: web.Request) -> web.StreamResponse:
    body = request[keys.BODY]
    clock = Clock()
    cfg = model_config(request, body["model"], "completion" if body.get("raw") or body.get("suffix") else "chat")
    think = _think(body.get("think"))
    if not body.get("prompt") and not body.get("suffix"):
        return await _load_only(request, cfg, "response")
    if body.get("images"):
        raise InvalidRequest("'images': this server's chat models take no images", param="images")
    if body.get("template"):
        raise InvalidRequest("'template' is not supported: the model's own chat template is used (send "
                             "\"raw\": true with a prompt you formatted yourself)", param="template")
    if body.get("raw") or body.get("suffix"):
        if body.get("context"):
            raise InvalidRequest("'context' cannot be used with 'raw' or 'suffix'", param="context")
        job, plan = _raw_job(request, cfg, body)
    else:
        messages = ([{"role": "system", "content": body["system"]}] if body.get("system") else [])
        messages.append({"role": "user", "content": body["prompt"]})
        job, plan = await chat_job(request, chat_body(cfg, body, messages))
    _check_think(job, think, body["model"])
    context = list(body.get("context") or ())
    prompt_ids: list[int] = []
    inner = job.build_prompts

    def build(engine: TextEngine) -> list[list[int]]:
        [ids] = inner(engine)
        if context:
            bad = [t for t in context if t >= engine.n_vocab]
            if bad:
                raise InvalidRequest(f"invalid context: token {bad[0]} is outside the model's vocabulary",
                                     param="context")
            bos = engine.info.bos_id
            ids = context + (ids[1:] if ids and bos is not None and ids[0] == bos else ids)
        prompt_ids[:] = ids
        return [ids]

    job.build_prompts = build  # the chat's own build sets the job's tool format and reasoning: the same job

    async def with_context(reply: Reply) -> dict[str, Any]:
        """Ollama's ``context``: the prompt's tokens and the answer's, to carry into the next request."""
        answer = "".join(reply.text)

        def tokens(engine: TextEngine) -> list[int]:
            return prompt_ids + (engine.tokenize(answer, add_bos=False, special=False) if answer else [])

        return {"context": await registry(request).read(cfg.name, tokens)}

    reply = Reply(body["model"], "response", think, clock)
    if body.get("raw"):
        return await _answer(request, cfg, job, plan, reply, body.get("stream", True) is not False)
    return await _answer(request, cfg, job, plan, reply, body.get("stream", True) is not False, with_context)
