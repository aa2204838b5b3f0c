"""Text generation shared by every GGUF backend: sampling parameters, stop strings, UTF-8, limits.

Engines only produce token ids (and, when asked, log-probabilities). Everything users see in the
text - incremental UTF-8 decoding, stop strings that must never appear (also when one spans two
tokens), ``max_tokens`` and the context limit, the finish reason and the token counts - is decided
here, once, so the two engines cannot disagree.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from localai_aio.backends.gguf_info import GGUFInfo
from localai_aio.errors import ContextLengthExceeded, InvalidRequest, NotImplementedForModel
from localai_aio.runtime import CancelFlag

MAX_STOP_SEQUENCES = 16
MAX_CHOICES = 16


@dataclass(frozen=True)
class GenParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; N >= 0: the chosen token plus N alternatives
    grammar: str | None = None
    ignore_eos: bool = False

    def for_choice(self, index: int) -> GenParams:
        """Choice ``i`` of ``n`` uses seed + i, so n choices differ yet the request stays reproducible."""
        return self if self.seed is None or index == 0 else replace(self, seed=self.seed + index)


@dataclass(frozen=True)
class TokenStep:
    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class TextEngine(Protocol):
    """What a GGUF backend's instance offers the generation loop."""

    n_ctx: int
    n_vocab: int
    info: GGUFInfo
    supports_grammar: bool
    supports_logprobs: bool

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def check_grammar(self, grammar: str) -> str | None: ...

    def generate(self, prompt: Sequence[int], params: GenParams) -> Iterator[TokenStep]: ...


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Piece:
    """Text ready to send for one choice (possibly empty when only log-probabilities come with it)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finish:
    index: int
    reason: str  # "stop" | "length"
    completion_tokens: int


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string is never emitted."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        self.held += text
        if not self.stops:
            out, self.held = self.held, ""
            return out, False
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.held[: min(hits)]
            self.held = ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.held)), 0, -1):
                if self.held.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _token_logprob(engine: TextEngine, step: TokenStep) -> TokenLogprob:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = engine.token_bytes(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    raw = engine.token_bytes(step.token)
    return TokenLogprob(token=raw.decode("utf-8", "replace"), logprob=float(step.logprob or 0.0),
                        bytes=list(raw), top_logprobs=[entry(t, lp) for t, lp in step.top])


def check_prompt_fits(engine: TextEngine, prompt: Sequence[int]) -> None:
    if len(prompt) >= engine.n_ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {engine.n_ctx} tokens; the prompt has {len(prompt)} "
            "tokens and leaves no room for an answer. Shorten the prompt.", param="messages")


def check_capabilities(engine: TextEngine, params: GenParams, backend: str) -> None:
    if params.grammar is not None:
        if not engine.supports_grammar:
            raise NotImplementedForModel(
                f"The '{backend}' backend cannot constrain output (tools, response_format or grammar); "
                "use a model with `backend: llama-cpp`", param="grammar")
        problem = engine.check_grammar(params.grammar)
        if problem:
            raise InvalidRequest(f"Invalid grammar: {problem}", param="grammar")
    if params.logprobs is not None and not engine.supports_logprobs:
        raise NotImplementedForModel(f"The '{backend}' backend does not report logprobs", param="logprobs")


def generate_choice(engine: TextEngine, prompt: Sequence[int], params: GenParams, index: int,
                    cancel: CancelFlag) -> Iterator[Piece | Finish]:
    """Generate one choice; yields ``Piece``s then exactly one ``Finish``."""
    budget = engine.n_ctx - len(prompt)
    if params.max_tokens is not None:
        budget = min(budget, params.max_tokens)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stopper = StopMatcher(params.stop)
    count = 0
    reason = "stop"
    if budget <= 0:
        yield Finish(index, "length", 0)
        return
    steps = engine.generate(prompt, params)
    try:
        for step in steps:
            if cancel.is_set():
                break
            if engine.is_eog(step.token) and not params.ignore_eos:
                break
            count += 1
            text, hit = stopper.feed(decoder.decode(engine.token_bytes(step.token)))
            logprobs = [_token_logprob(engine, step)] if params.logprobs is not None else []
            if text or logprobs:
                yield Piece(index, text, logprobs)
            if hit:
                yield Finish(index, "stop", count)
                return
            if count >= budget:
                reason = "length"
                break
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()
    tail, hit = stopper.feed(decoder.decode(b"", final=True))
    tail += "" if hit else stopper.flush()
    if tail:
        yield Piece(index, tail)
    yield Finish(index, "stop" if hit else reason, count)


# ---------------------------------------------------------------------------------------------------------
# Request fields -> GenParams
# ---------------------------------------------------------------------------------------------------------

def _number(body: Mapping[str, Any], key: str, lo: float, hi: float, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidRequest(f"Invalid value for '{key}': must be a number", param=key)
    if not lo <= value <= hi:
        raise InvalidRequest(f"Invalid value for '{key}': {value} is not within [{lo:g}, {hi:g}]", param=key)
    return value


def _integer(body: Mapping[str, Any], key: str, lo: int, hi: int | None, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"Invalid value for '{key}': must be an integer", param=key)
    if value < lo or (hi is not None and value > hi):
        bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise InvalidRequest(f"Invalid value for '{key}': must be {bound}, got {value}", param=key)
    return value


def parse_stop(value: Any, extra: Sequence[str] = ()) -> tuple[str, ...]:
    if value is None:
        stops: list[str] = []
    elif isinstance(value, str):
        stops = [value]
    elif isinstance(value, list) and all(isinstance(s, str) for s in value):
        stops = list(value)
    else:
        raise InvalidRequest("Invalid value for 'stop': must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"Invalid value for 'stop': at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return tuple(dict.fromkeys([s for s in stops if s] + [s for s in extra if s]))


def parse_params(body: Mapping[str, Any], defaults: Mapping[str, Any], *, stopwords: Sequence[str] = (),
                 logprobs: int | None = None, grammar: str | None = None) -> GenParams:
    """Model YAML ``parameters`` give the defaults; the request overrides them."""
    merged = {**{k: v for k, v in defaults.items() if v is not None},
              **{k: v for k, v in body.items() if v is not None}}
    base = GenParams()
    max_tokens = merged.get("max_completion_tokens", merged.get("max_tokens"))
    if max_tokens is not None:
        key = "max_completion_tokens" if "max_completion_tokens" in merged else "max_tokens"
        max_tokens = _integer({key: max_tokens}, key, 1, None, None)
    seed = _integer(merged, "seed", -(2**63), 2**63 - 1, None)
    return GenParams(
        max_tokens=max_tokens,
        temperature=float(_number(merged, "temperature", 0, 2, base.temperature)),
        top_p=float(_number(merged, "top_p", 0, 1, base.top_p)),
        top_k=int(_integer(merged, "top_k", 0, None, base.top_k)),
        min_p=float(_number(merged, "min_p", 0, 1, base.min_p)),
        repeat_penalty=float(_number(merged, "repeat_penalty", 0, 10, base.repeat_penalty)),
        presence_penalty=float(_number(merged, "presence_penalty", -2, 2, base.presence_penalty)),
        frequency_penalty=float(_number(merged, "frequency_penalty", -2, 2, base.frequency_penalty)),
        seed=None if seed is None or seed < 0 else seed % (2**32),
        stop=parse_stop(body.get("stop", defaults.get("stop")), stopwords),
        logprobs=logprobs,
        grammar=grammar,
        ignore_eos=bool(merged.get("ignore_eos", False)),
    )


def parse_n(body: Mapping[str, Any]) -> int:
    return int(_integer(body, "n", 1, MAX_CHOICES, 1))
