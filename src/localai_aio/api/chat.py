"""POST /v1/chat/completions (and LocalAI's /chat/completions), with tools and structured output."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from localai_aio.api.common import json_route, new_id, now, registry, resolve_model
from localai_aio.api.text import Prepared, TextJob, generation, serve_text, stream_options
from localai_aio.config import ModelConfig
from localai_aio.errors import InvalidRequest
from localai_aio.generation import Piece, TextEngine, TokenLogprob, parse_n, parse_params
from localai_aio.openapi import answers
from localai_aio.prompts import chat_template_source, normalize_messages, render_chat
from localai_aio.reasoning import ReasoningSplitter, markers_for
from localai_aio.tools import ToolPlan, looks_like_call, parse_calls, plan_tools, tool_prompt

routes = web.RouteTableDef()
MAX_TOP_LOGPROBS = 20
ARGUMENT_FRAGMENT = 24  # characters of a streamed tool call's arguments per delta


class ChatFormat:
    """Shapes chat answers; with tools, decides per choice whether the model wrote text or a call."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, plan: ToolPlan | None = None, job: TextJob | None = None):
        self.plan = plan or ToolPlan()
        self.job = job
        self._mode: dict[int, str] = {}  # choice index -> "undecided" | "text" | "call"
        self._held: dict[int, str] = {}
        self._thinking: dict[int, ReasoningSplitter] = {}

    def splitter(self, index: int) -> ReasoningSplitter | None:
        """Reasoning is split off before anything else looks at the text (read once the prompt exists)."""
        if self.job is None or self.job.reasoning is None:
            return None
        if index not in self._thinking:
            self._thinking[index] = ReasoningSplitter(self.job.reasoning, inside=self.job.opens_reasoning)
        return self._thinking[index]

    def _reasoning_chunk(self, index: int, text: str) -> dict:
        return {"index": index, "delta": {"reasoning_content": text}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def _logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                             "top_logprobs": e.top_logprobs} for e in entries]}

    def _calls(self, text: str) -> list[dict[str, Any]] | None:
        if not self.plan.calls_expected or not looks_like_call(text):
            return None
        return parse_calls(text, self.plan.names or None)

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish_reason: str) -> dict:
        reasoning = ""
        splitter = self.splitter(index)
        if splitter is not None:
            (thought, answer), (rest, tail) = splitter.feed(text), splitter.finish()
            reasoning, text = thought + rest, answer + tail
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls = self._calls(text) if finish_reason != "length" else None
        if calls is None and self.plan.calls_expected and looks_like_call(text):
            message["content"] = None  # a call cut short by max_tokens: its JSON is not an answer
        elif calls and self.plan.legacy:
            message = {"role": "assistant", "content": None, "function_call": calls[0]["function"]}
            finish_reason = "function_call"
        elif calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
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
        mode = self._mode.setdefault(index, "undecided")
        if mode == "text":
            return [self._content(index, text, logprobs)]
        held = self._held.get(index, "") + text
        self._held[index] = held
        if mode == "undecided" and held.strip():
            if looks_like_call(held):
                self._mode[index] = "call"  # buffered: tool JSON never goes out as content
            else:
                self._mode[index] = "text"
                self._held[index] = ""
                return [self._content(index, held, logprobs)]
        return []

    def finish_chunks(self, index: int, finish_reason: str) -> list[dict]:
        out: list[dict] = []
        splitter = self._thinking.pop(index, None)
        if splitter is not None:
            thought, answer = splitter.finish()
            out += [self._reasoning_chunk(index, thought)] if thought else []
            out += self._answer_chunks(index, answer, None) if answer else []
        return out + self._closing_chunks(index, finish_reason)

    def _closing_chunks(self, index: int, finish_reason: str) -> list[dict]:
        held = self._held.pop(index, "")
        mode = self._mode.pop(index, "text")
        out: list[dict] = []
        calls = self._calls(held) if mode == "call" and finish_reason != "length" else None
        if calls:
            out += self._call_deltas(index, calls)
            finish_reason = "function_call" if self.plan.legacy else "tool_calls"
        elif held and mode != "call":
            out.append(self._content(index, held, None))
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
    """Templates that know nothing of tools still get to see them, and earlier calls, as plain text."""
    if not plan.tools or "tools" in source:
        knows_calls = "tool_calls" in source
        return [_with_call_text(m) if not knows_calls else m for m in messages]
    instructions = tool_prompt(plan.tools, plan.required)
    shaped = [_with_call_text(m) for m in messages]
    if shaped and shaped[0]["role"] == "system":
        shaped[0] = {**shaped[0], "content": f"{shaped[0]['content']}\n\n{instructions}"}
    else:
        shaped.insert(0, {"role": "system", "content": instructions})
    return shaped


def _with_call_text(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls") or ([{"function": message["function_call"]}]
                                          if isinstance(message.get("function_call"), dict) else None)
    if message.get("role") != "assistant" or not calls or message.get("content"):
        return message
    rendered = []
    for call in calls:
        fn = call.get("function") or {}
        arguments = fn.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass
        rendered.append({"name": fn.get("name"), "arguments": arguments})
    text = json.dumps(rendered[0] if len(rendered) == 1 else rendered, ensure_ascii=False)
    return {**message, "content": text}


def build_chat_job(request: web.Request, body: dict[str, Any]) -> tuple[TextJob, ToolPlan]:
    cfg = resolve_model(request, body.get("model"), "chat")
    reg = registry(request)
    messages = normalize_messages(body.get("messages"), cfg.system_prompt)
    logprobs = chat_logprobs(body)
    plan = plan_tools(body, cfg.function)
    params = parse_params(body, sampling_defaults(cfg), stopwords=cfg.stopwords, logprobs=logprobs,
                          grammar=plan.grammar)

    def build(engine: TextEngine) -> list[list[int]]:
        info = engine.info
        source = chat_template_source(cfg.template, info.chat_template, cfg.name)
        shaped = _messages_for_template(messages, plan, source)
        text = render_chat(source, shaped, bos_token=info.token_text(info.bos_id),
                           eos_token=info.token_text(info.eos_id),
                           tools=[dict(t) for t in plan.tools] or None)
        if job.reasoning is not None:  # e.g. "<|im_start|>assistant\n<think>\n": the answer starts thinking
            job.opens_reasoning = text.rstrip().endswith(job.reasoning.start)
        ids = engine.tokenize(text, add_bos=False, special=True)
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


TurnEvent = TextDelta | CallStart | ArgumentsDelta | TurnEnd


async def turn_events(app: web.Application, job: TextJob, plan: ToolPlan, task: str
                      ) -> AsyncIterator[Prepared | TurnEvent]:
    """A one-choice chat generation: ``Prepared`` first, then text, tool calls and the end, decided by
    the same ``ChatFormat`` that shapes chat completions, so every protocol sees the same turn. Close
    it (``contextlib.aclosing``) to stop the generation."""
    fmt = ChatFormat(plan, job)
    async with generation(app, job, task) as (prepared, events):
        yield prepared
        async for event in events:
            if isinstance(event, Piece):
                chunks = fmt.chunks(event.index, event.text, None)
            else:
                chunks = fmt.finish_chunks(event.index, event.reason)
            for chunk in chunks:
                delta = chunk["delta"]  # reasoning_content is not part of these protocols' answer text
                if delta.get("content"):
                    yield TextDelta(delta["content"])
                for call in delta.get("tool_calls", ()):
                    if "id" in call:
                        yield CallStart(call["id"], call["function"]["name"])
                    if call["function"].get("arguments"):
                        yield ArgumentsDelta(call["function"]["arguments"])
                if chunk["finish_reason"] is not None:
                    yield TurnEnd(chunk["finish_reason"], event.completion_tokens, event.stop_sequence)


@routes.post("/v1/chat/completions")
@routes.post("/chat/completions")
@json_route("post", "/v1/chat/completions", "chat", use_case="chat", responses=answers("ChatCompletion", stream=True))
async def chat_completions(request: web.Request) -> web.StreamResponse:
    job, plan = build_chat_job(request, request["data"])
    return await serve_text(request, job, ChatFormat(plan, job), new_id("chatcmpl"), now())
