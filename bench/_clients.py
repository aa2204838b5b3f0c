"""What the text benchmarks share on the client side: the official openai client, a mixed warm-up, timed
streaming chats, percentiles, MET/NOT MET lines and the local model's settings (file, context, system prompt).

Works against any OpenAI-compatible server: nothing here depends on this project's server.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"

WARMUP_QUESTIONS = [
    "What is the capital of France?", "Name three colors.", "What is two plus two?", "Say hello.",
    "What is the largest planet?", "Write one sentence about the sea.", "List four fruits.",
    "Why is the sky blue? Answer briefly.",
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}


def client(url: str, timeout: float = 300.0):  # noqa: ANN201
    """An openai client for ``url`` (the server root, without /v1); no retries so failures show."""
    import openai

    return openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "bench"),
                         max_retries=0, timeout=timeout)


@dataclasses.dataclass
class Stream:
    """One timed streaming chat: times are time.perf_counter() values."""

    sent: float
    first: float | None = None
    last: float | None = None
    pieces: int = 0  # chunks that carried text
    text: str = ""
    finish: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None

    def arrived(self, piece: str) -> None:
        """A streamed piece of text, timed as it arrives."""
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.pieces += 1
        self.text += piece

    def finished(self) -> Stream:
        if self.error is None and self.first is None:
            self.error = "no text was streamed"
        return self

    @property
    def ttft(self) -> float:
        assert self.first is not None
        return self.first - self.sent

    @property
    def tokens(self) -> int:
        """Completion tokens: the server's usage when it sent one, else the number of text chunks."""
        return self.completion_tokens if self.completion_tokens is not None else self.pieces

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one (chunks, one token each in the usual case)."""
        assert self.first is not None and self.last is not None and self.pieces > 1, "fewer than 2 tokens"
        return (self.pieces - 1) / (self.last - self.first)


def stream_chat(cl, model: str, messages: list[dict[str, Any]], max_tokens: int,  # noqa: ANN001
                temperature: float = 0.0, usage: bool = True, **extra: Any) -> Stream:
    """Send one streaming chat and time it; errors are recorded in ``Stream.error``, not raised."""
    if usage:
        extra["stream_options"] = {"include_usage": True}
    result = Stream(sent=time.perf_counter())
    try:
        stream = cl.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                            temperature=temperature, stream=True, **extra)
        for chunk in stream:
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.completion_tokens = chunk.usage.completion_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                if details is not None and getattr(details, "cached_tokens", None) is not None:
                    result.cached_tokens = details.cached_tokens
            for choice in chunk.choices:
                if choice.finish_reason:
                    result.finish = choice.finish_reason
                piece = choice.delta.content if choice.delta else None
                if piece:
                    result.arrived(piece)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports failures, it does not stop at the first
        result.error = f"{type(exc).__name__}: {exc}"
    return result.finished()


def stream_response(cl, model: str, messages: list[dict[str, Any]], max_tokens: int,  # noqa: ANN001
                    temperature: float = 0.0) -> Stream:
    """The same as ``stream_chat`` through the Responses API (``client.responses.create(stream=True)``)."""
    result = Stream(sent=time.perf_counter())
    system = [m["content"] for m in messages if m["role"] == "system"]
    try:
        stream = cl.responses.create(model=model, input=[m for m in messages if m["role"] != "system"],
                                     instructions=system[0] if system else None, max_output_tokens=max_tokens,
                                     temperature=temperature, store=False, stream=True)
        for event in stream:
            if event.type == "response.output_text.delta" and event.delta:
                result.arrived(event.delta)
            elif event.type in ("response.completed", "response.incomplete"):
                usage = event.response.usage
                result.prompt_tokens, result.completion_tokens = usage.input_tokens, usage.output_tokens
                result.finish = event.response.status
    except Exception as exc:  # noqa: BLE001 - a benchmark reports failures, it does not stop at the first
        result.error = f"{type(exc).__name__}: {exc}"
    return result.finished()


def _warm_one(cl, model: str, kind: str, i: int) -> None:  # noqa: ANN001
    question = WARMUP_QUESTIONS[i % len(WARMUP_QUESTIONS)]
    messages = [{"role": "user", "content": question}]
    temperature = 0.0 if i % 2 else 0.7
    if kind == "chat-stream":
        for _ in cl.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=temperature,
                                            stream=True, stream_options={"include_usage": True}):
            pass
    elif kind == "chat":
        cl.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=temperature)
    elif kind == "completion":
        cl.completions.create(model=model, prompt=f"Q: {question}\nA:", max_tokens=24, temperature=temperature)
    elif kind == "completion-stream":
        for _ in cl.completions.create(model=model, prompt=f"Q: {question}\nA:", max_tokens=24,
                                       temperature=temperature, stream=True):
            pass
    elif kind == "tools":
        cl.chat.completions.create(
            model=model, max_tokens=48, temperature=temperature, tools=[WEATHER_TOOL], tool_choice="auto",
            messages=[{"role": "user", "content": f"What is the weather in {['Paris', 'Oslo', 'Lima'][i % 3]}?"}])
    else:
        raise ValueError(kind)


WARMUP_KINDS = ("chat-stream", "chat", "completion", "completion-stream", "tools", "chat-stream")


def warm_up(url: str, model: str, sequential: int = 24, concurrent_groups: int = 2, group_size: int = 4,
            label: str = "") -> None:
    """Mixed traffic before anything is measured: ``sequential`` requests cycling through streaming and
    non-streaming chat, /v1/completions (both) and a chat with ``tools``, then ``concurrent_groups`` bursts
    of ``group_size`` simultaneous requests (threads, one client each). 32 requests by default. Failures
    are counted and printed, not raised."""
    ok: collections.Counter[str] = collections.Counter()
    failed: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    lock = threading.Lock()

    took: collections.Counter[str] = collections.Counter()

    def run(cl, kind: str, i: int) -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        try:
            _warm_one(cl, model, kind, i)
        except Exception as exc:  # noqa: BLE001
            with lock:
                failed[kind] += 1
                errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            with lock:
                ok[kind] += 1
        with lock:
            took[kind] += time.perf_counter() - t0

    start = time.perf_counter()
    cl = client(url)
    for i in range(sequential):
        run(cl, WARMUP_KINDS[i % len(WARMUP_KINDS)], i)
    cl.close()
    clients = [client(url) for _ in range(group_size)]
    for g in range(concurrent_groups):
        threads = [threading.Thread(target=run, args=(c, WARMUP_KINDS[(g + j) % len(WARMUP_KINDS)], g * 7 + j))
                   for j, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for c in clients:
        c.close()
    total = sum(ok.values()) + sum(failed.values())
    kinds = ", ".join(f"{k} {ok[k] + failed[k]} ({took[k]:.1f} s)" for k in dict.fromkeys(WARMUP_KINDS))
    name = f" {label}" if label else ""
    print(f"warm-up{name}: {total} requests ({kinds}; {concurrent_groups} bursts of {group_size} concurrent) "
          f"in {time.perf_counter() - start:.1f} s, {sum(failed.values())} failed", flush=True)
    for line in errors[:3]:
        print(f"  warm-up failure: {line}")


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100) of a non-empty list."""
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


@dataclasses.dataclass(frozen=True)
class LocalModel:
    """A model as this project's models directory describes it (for the direct and llama-server runs)."""

    name: str
    gguf: Path | None
    context_size: int
    system_prompt: str | None
    threads: int | None  # the YAML's `threads`, which overrides the server default
    extra_buffers: bool  # weights repacked into llama.cpp's extra buffer types (AMX etc.), as our server does


def local_model(models_path: str, model: str, gguf: str | None = None) -> LocalModel | None:
    """Read ``model``'s YAML from ``models_path`` with the project's own loader; None if it is not there
    (and no ``gguf`` was given)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from localai_aio.backends.llama_cpp import extra_buffers  # the server's own rule, so all sides match

    try:
        from localai_aio.config import load_model_configs

        configs, _ = load_model_configs(models_path)
    except Exception:  # noqa: BLE001 - a missing or foreign checkout: fall back to --gguf alone
        configs = {}
    cfg = configs.get(model)
    if cfg is None:
        for c in configs.values():
            if model in c.aliases:
                cfg = c
                break
    if cfg is not None and not cfg.error:
        return LocalModel(cfg.name, Path(gguf) if gguf else cfg.model_path, int(cfg.context_size or 2048),
                          cfg.system_prompt, int(cfg.threads) if cfg.threads else None,
                          extra_buffers(cfg))
    if gguf:
        return LocalModel(model, Path(gguf), 2048, None, None, extra_buffers(None))
    return None


def default_threads(requested: int | None, model: LocalModel | None) -> int:
    """The thread count our server uses at its defaults: --threads if given, else the YAML's `threads`,
    else the CPU count."""
    if requested:
        return requested
    if model is not None and model.threads:
        return model.threads
    return max(1, os.cpu_count() or 1)
