"""A chat request as every protocol shares it: the job built from messages, tools and sampling fields, its
answer shaped as OpenAI chat chunks (``ChatFormat``), and one turn as protocol-neutral events
(``turn_events``) for the Responses and Messages APIs. The routes are ``api.openai.chat``'s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from localai_aio.api.common import registry, resolve_model
from localai_aio.api.sampling import parse_n, parse_params
from localai_aio.api.text_jobs import Prepared, TextJob, generation, stream_options
from localai_aio.backends.text import TextEngine
from localai_aio.config import ModelConfig
from localai_aio.errors import InvalidRequest
from localai_aio.runtime import run_sized
from localai_aio.server import keys
from localai_aio.text.choices import Piece, TokenLogprob
from localai_aio.text.engine_fit import tokenize_prompt
from localai_aio.text.prompts import chat_template_source, normalize_messages, render_chat
from localai_aio.text.reasoning import ReasoningSplitter, markers_for
from localai_aio.text.tool_formats import GENERIC, CallSplitter, ToolFormat, detect, object_arguments
from localai_aio.text.tools import ToolPlan, plan_tools, tool_prompt

MAX_TOP_LOGPROBS = 20
ARGUMENT_FRAGMENT = 24  # characters of a streamed tool call's arguments per delta


class ChatFormat:
    """Shapes chat answers; with tools, splits each choice's text into content and calls in the model's
    tool format (read from the job once its prompt is built)."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, plan: ToolPlan | None = None, job: TextJob | None = None):
        self.plan = plan or ToolPlan()
        self.job = job
        self._calls: dict[int, CallSplitter] = {}
        self._thinking: dict[int, ReasoningSplitter] = {}

    @property
    def tool_format(self) -> ToolFormat:
        return self.job.tool_format if self.job is not None else GENERIC

    def splitter(self, index: int) -> ReasoningSplitter | None:
        """Reasoning is split off before anything else looks at the text (read once the prompt exists)."""
        if self.job is None or self.job.reasoning is None:
            return None
        if index not in self._thinking:
            self._thinking[index] = ReasoningSplitter(self.job.reasoning, inside=self.job.opens_reasoning)
        return self._thinking[index]

    def _call_splitter(self, index: int) -> CallSplitter:
        if index not in self._calls:
            self._calls[index] = CallSplitter(self.tool_format)
        return self._calls[index]

    def _reasoning_chunk(self, index: int, text: str) -> dict:
        return {"index": index, "delta": {"reasoning_content": text}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def _logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                             "top_logprobs": e.top_logprobs} for e in entries]}

    def _parsed(self, calls_text: str | None, finish_reason: str) -> list[dict[str, Any]] | None:
        """The calls in a finished choice; none from a call that max_tokens cut short."""
        if calls_text is None or finish_reason == "length":
            return None
        return self.tool_format.parse(calls_text, self.plan.names)

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish_reason: str) -> dict:
        reasoning = ""
        splitter = self.splitter(index)
        if splitter is not None:
            (thought, answer), (rest, tail) = splitter.feed(text), splitter.finish()
            reasoning, text = thought + rest, answer + tail
        calls_text = None
        if self.plan.calls_expected:
            calls = self._call_splitter(index)
            text = calls.feed(text)
            tail, calls_text = calls.finish()
            text += tail
        calls = self._parsed(calls_text, finish_reason)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls_text is not None:  # the call's markup is never an answer, parsed or not
            message["content"] = text if text.strip() else None
        if calls and self.plan.legacy:
            message = {"role": "assistant", "content": message["content"], "function_call": calls[0]["function"]}
            finish_reason = "function_call"
        elif calls:
            message["tool_calls"] = calls
            finish_reason = "tool_calls"
        if reasoning:
            message["reasoning_content"] = reasoning
        return {"index": index, "message": message, "logprobs": self._logprobs(logprobs),
                "finish_reason": finish_reason}

    def first_chunks(self, indexes: Sequence[int]) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in indexes]

    def _content(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> dict:
        return {"index": index, "delta": {"content": text}, "logprobs": self._logprobs(logprobs),
                "finish_reason": None}

    def chunks(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[dict]:
        splitter = self.splitter(index)
        if splitter is None:
            return self._answer_chunks(index, text, logprobs)
        thought, answer = splitter.feed(text)
        out = [self._reasoning_chunk(index, thought)] if thought else []
        if answer or (logprobs and not thought):
            out += self._answer_chunks(index, answer, logprobs)
        return out

    def _answer_chunks(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[dict]:
        if not self.plan.calls_expected:
            return [self._content(index, text, logprobs)]
        content = self._call_splitter(index).feed(text)
        return [self._content(index, content, logprobs)] if content else []

    def finish_chunks(self, index: int, finish_reason: str) -> list[dict]:
        out: list[dict] = []
        splitter = self._thinking.pop(index, None)
        if splitter is not None:
            thought, answer = splitter.finish()
            out += [self._reasoning_chunk(index, thought)] if thought else []
            out += self._answer_chunks(index, answer, None) if answer else []
        return out + self._closing_chunks(index, finish_reason)

    def _closing_chunks(self, index: int, finish_reason: str) -> list[dict]:
        out: list[dict] = []
        splitter = self._calls.pop(index, None)
        if splitter is not None:
            content, calls_text = splitter.finish()
            if content:
                out.append(self._content(index, content, None))
            calls = self._parsed(calls_text, finish_reason)
            if calls:
                out += self._call_deltas(index, calls)
                finish_reason = "function_call" if self.plan.legacy else "tool_calls"
        out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason})
        return out

    def _call_deltas(self, index: int, calls: list[dict[str, Any]]) -> list[dict]:
        out = []
        for position, call in enumerate(calls):
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            pieces = [arguments[i:i + ARGUMENT_FRAGMENT] for i in range(0, len(arguments), ARGUMENT_FRAGMENT)]
            if self.plan.legacy:
                deltas = [{"function_call": {"name": name, "arguments": ""}}]
                deltas += [{"function_call": {"arguments": p}} for p in pieces]
            else:
                deltas = [{"tool_calls": [{"index": position, "id": call["id"], "type": "function",
                                           "function": {"name": name, "arguments": ""}}]}]
                deltas += [{"tool_calls": [{"index": position, "function": {"arguments": p}}]} for p in pieces]
            out += [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
            if self.plan.legacy:
                break  # the legacy shape has a single function_call
        return out


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


def sampling_defaults(cfg: ModelConfig) -> dict[str, Any]:
    """A model's YAML ``parameters`` plus its ``seed``: the defaults every request may override."""
    return {**cfg.parameters, **({"seed": cfg.seed} if cfg.seed is not None else {})}


def _messages_for_template(messages: list[dict[str, Any]], plan: ToolPlan, source: str) -> list[dict[str, Any]]:
    """Templates that know nothing of tools still get to see them, and earlier calls, as plain text;
    templates that do get earlier calls' arguments as they write them."""
    if not plan.tools or "tools" in source:
        if "tool_calls" not in source:
            return [_with_call_text(m) for m in messages]
        if object_arguments(source):
            return [_with_call_objects(m) for m in messages]
        return messages
    instructions = tool_prompt(plan.tools, plan.required)
    shaped = [_with_call_text(m) for m in messages]
    if shaped and shaped[0]["role"] == "system":
        shaped[0] = {**shaped[0], "content": f"{shaped[0]['content']}\n\n{instructions}"}
    else:
        shaped.insert(0, {"role": "system", "content": instructions})
    return shaped


def _arguments(fn: dict[str, Any]) -> Any:
    """A call's arguments as an object, when OpenAI's JSON string holds one."""
    arguments = fn.get("arguments", "{}")
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments


def _with_call_objects(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("role") != "assistant" or not message.get("tool_calls"):
        return message
    calls = [{**call, "function": {**(call.get("function") or {}), "arguments": _arguments(call.get("function") or {})}}
             for call in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _with_call_text(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls") or ([{"function": message["function_call"]}]
                                          if isinstance(message.get("function_call"), dict) else None)
    if message.get("role") != "assistant" or not calls or message.get("content"):
        return message
    rendered = [{"name": (call.get("function") or {}).get("name"), "arguments": _arguments(call.get("function") or {})}
                for call in calls]
    text = json.dumps(rendered[0] if len(rendered) == 1 else rendered, ensure_ascii=False)
    return {**message, "content": text}


#: Conversations of more messages than this are checked and shaped on a worker thread.
OFF_LOOP_MESSAGES = 512


async def chat_job(request: web.Request, body: dict[str, Any]) -> tuple[TextJob, ToolPlan]:
    """``build_chat_job``, on a worker thread for a long conversation: checking and shaping thousands of
    messages would hold the event loop, which writes every stream's tokens, for tens of milliseconds."""
    messages = body.get("messages")
    return await run_sized(isinstance(messages, list) and len(messages) > OFF_LOOP_MESSAGES, build_chat_job,
                           request, body)


def build_chat_job(request: web.Request, body: dict[str, Any]) -> tuple[TextJob, ToolPlan]:
    cfg = resolve_model(request, body.get("model"), "chat")
    reg = registry(request)
    messages = normalize_messages(body.get("messages"), cfg.system_prompt)
    logprobs = chat_logprobs(body)
    plan = plan_tools(body, cfg.function)
    params = parse_params(body, sampling_defaults(cfg), stopwords=cfg.stopwords, logprobs=logprobs,
                          grammar=plan.grammar, grammar_param=plan.grammar_param,
                          cache_scope=request[keys.PRINCIPAL].cache_scope)

    def build(engine: TextEngine) -> list[list[int]]:
        info = engine.info
        source = chat_template_source(cfg.template, info.chat_template, cfg.name)
        if plan.tools:  # calls in the model's own format when its template renders the tools itself
            job.tool_format = detect(source)
            grammar, trigger = plan.constraint(job.tool_format)
            markers = tuple(m for m in (job.tool_format.opener, job.tool_format.closer) if m)
            job.params = replace(job.params, grammar=grammar, grammar_param=plan.grammar_param,
                                 grammar_trigger=trigger, shown_tokens=markers)
        shaped = _messages_for_template(messages, plan, source)
        text = render_chat(source, shaped, bos_token=info.token_text(info.bos_id),
                           eos_token=info.token_text(info.eos_id),
                           tools=[dict(t) for t in plan.tools] or None)
        if job.reasoning is not None:  # e.g. "<|im_start|>assistant\n<think>\n": the answer starts thinking
            job.opens_reasoning = text.rstrip().endswith(job.reasoning.start)
        ids = tokenize_prompt(engine, text, add_bos=False, special=True)
        if info.add_bos and info.bos_id is not None and (not ids or ids[0] != info.bos_id):
            ids.insert(0, info.bos_id)
        return [ids]

    job = TextJob(cfg=cfg, backend=reg.backend_name(cfg) or "", build_prompts=build, params=params,
                  n=parse_n(body), stream=bool(body.get("stream")), include_usage=stream_options(body),
                  want_logprobs=logprobs is not None, reasoning=markers_for(cfg.option("reasoning")))
    return job, plan


# -- one chat turn as protocol-neutral events (for the Responses and Messages APIs) ------------------------

@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ThinkingDelta:
    """Reasoning text (only from ``turn_events(..., thinking=True)``)."""

    text: str


@dataclass(frozen=True)
class CallStart:
    call_id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    text: str


@dataclass(frozen=True)
class TurnEnd:
    reason: str  # "stop" | "length" | "tool_calls"
    completion_tokens: int
    stop_sequence: str | None = None  # the stop string that ended the text, if one did


TurnEvent = TextDelta | ThinkingDelta | CallStart | ArgumentsDelta | TurnEnd


async def turn_events(app: web.Application, job: TextJob, plan: ToolPlan, task: str, *, thinking: bool = False
                      ) -> AsyncIterator[Prepared | TurnEvent]:
    """A one-choice chat generation: ``Prepared`` first, then text, tool calls and the end, decided by
    the same ``ChatFormat`` that shapes chat completions, so every protocol sees the same turn; with
    ``thinking``, the reasoning text too. Close it (``contextlib.aclosing``) to stop the generation."""
    fmt = ChatFormat(plan, job)
    async with generation(app, job, task) as (prepared, events):
        yield prepared
        async for event in events:
            if isinstance(event, Piece):
                chunks = fmt.chunks(event.index, event.text, None)
            else:
                chunks = fmt.finish_chunks(event.index, event.reason)
            for chunk in chunks:
                delta = chunk["delta"]  # reasoning_content is not part of the answer text
                if thinking and delta.get("reasoning_content"):
                    yield ThinkingDelta(delta["reasoning_content"])
                if delta.get("content"):
                    yield TextDelta(delta["content"])
                for call in delta.get("tool_calls", ()):
                    if "id" in call:
                        yield CallStart(call["id"], call["function"]["name"])
                    if call["function"].get("arguments"):
                        yield ArgumentsDelta(call["function"]["arguments"])
                if chunk["finish_reason"] is not None:
                    yield TurnEnd(chunk["finish_reason"], event.completion_tokens, event.stop_sequence)
