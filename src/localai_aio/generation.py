"""Text generation shared by every GGUF backend: sampling parameters, stop strings, UTF-8, limits.

Engines only produce token ids (and, when asked, log-probabilities). Everything users see in the
text - incremental UTF-8 decoding, stop strings that must never appear (also when one spans two
tokens), ``max_tokens`` and the context limit, the finish reason and the token counts - is decided
here, once, so the two engines cannot disagree.
"""

from __future__ import annotations

import asyncio
import codecs
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from localai_aio.backends.gguf_info import GGUFInfo
from localai_aio.errors import ContextLengthExceeded, InvalidRequest, NotImplementedForModel
from localai_aio.schemas import BOUNDS

MAX_STOP_SEQUENCES = 16
MAX_LOGIT_BIAS = 300


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
    grammar: str | None = None  # llguidance Lark, or llama.cpp GBNF
    grammar_param: str = "grammar"  # the request field the grammar comes from, for its errors
    grammar_trigger: str | None = None  # the grammar applies only once the output has this text (lazy)
    shown_tokens: tuple[str, ...] = ()  # special tokens written out as text (a tool format's markers)
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    typical_p: float = 1.0
    mirostat: int = 0  # 0: off; 1 or 2: Mirostat v1 / v2 in place of top-k, top-p and min-p
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    repeat_last_n: int = 64  # tokens the penalties look back over (-1: the whole context, 0: none)
    cache_scope: str = ""  # requests reuse each other's cached prompt tokens only within one scope

    def for_choice(self, index: int) -> GenParams:
        """Choice ``i`` of ``n`` uses seed + i, so n choices differ yet the request stays reproducible."""
        return self if self.seed is None or index == 0 else replace(self, seed=self.seed + index)


@dataclass(frozen=True)
class TokenStep:
    """One generated token, with its bytes (looked up on the engine's thread) and, when asked, logprobs."""

    token: int
    piece: bytes
    logprob: float | None = None
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class SeqEnd:
    """A choice ended in the engine: ``"stop"`` (end of generation token) or ``"length"`` (its budget)."""

    reason: str
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused instead of computed


class TokenStream:
    """One request's token events, handed from the engine's thread to the event loop.

    The engine side calls ``push``/``fail`` and asks ``wanted(i)`` before every token: the event loop
    side marks a choice done (a stop string was reached) or the whole request cancelled (the client
    left), and the engine drops it within one step.
    """

    def __init__(self, choices: int):
        self.loop = asyncio.get_running_loop()
        self.choices = choices
        self._queue: asyncio.Queue[tuple[int, TokenStep | SeqEnd | BaseException]] = asyncio.Queue()
        self._done = [False] * choices
        self.cancelled = False

    # -- engine thread --
    def wanted(self, index: int) -> bool:
        return not self.cancelled and not self._done[index]

    def push(self, index: int, item: TokenStep | SeqEnd) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))

    def fail(self, exc: BaseException) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, (-1, exc))

    # -- event loop --
    def finish(self, index: int) -> None:
        self._done[index] = True

    def cancel(self) -> None:
        self.cancelled = True

    async def get(self) -> tuple[int, TokenStep | SeqEnd]:
        index, item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return index, item


class TextEngine(Protocol):
    """What a GGUF backend's instance offers the API; every method runs on the engine's own thread."""

    n_ctx: int
    n_vocab: int
    info: GGUFInfo
    supports_grammar: bool
    supports_logprobs: bool
    sampling: frozenset[str]  # the EXTRA_SAMPLING fields this engine applies
    n_vocab: int

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def check_grammar(self, grammar: str) -> str | None: ...

    def start(self, prompt: Sequence[int], params: Sequence[GenParams], stream: TokenStream) -> None:
        """Generate one choice per ``params`` entry for ``prompt``, reporting into ``stream``. A batching
        engine queues the work and returns; a sequential one generates before it returns."""


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
    cached_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended the choice, if one did


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string is never emitted."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit, the stop string reached or None)."""
        self.held += text
        if not self.stops:
            out, self.held = self.held, ""
            return out, None
        hits = [(at, stop) for stop in self.stops if (at := self.held.find(stop)) >= 0]
        if hits:
            at, stop = min(hits)
            out = self.held[:at]
            self.held = ""
            return out, stop
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.held)), 0, -1):
                if self.held.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, None

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


#: Sampling beyond temperature, top-k, top-p and the repeat penalty, by GenParams field: an engine names
#: the ones it applies (``TextEngine.sampling``); a request that sets another one gets 400 naming it.
EXTRA_SAMPLING = ("min_p", "presence_penalty", "frequency_penalty", "logit_bias", "typical_p", "mirostat",
                  "repeat_last_n")


def asked_sampling(params: GenParams) -> list[str]:
    """The extra sampling fields ``params`` sets to something other than their neutral default."""
    neutral = GenParams()
    return [name for name in EXTRA_SAMPLING if getattr(params, name) != getattr(neutral, name)]


def _token_logprob(step: TokenStep) -> TokenLogprob:
    def entry(raw: bytes, logprob: float) -> dict[str, Any]:
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return TokenLogprob(token=step.piece.decode("utf-8", "replace"), logprob=float(step.logprob or 0.0),
                        bytes=list(step.piece), top_logprobs=[entry(raw, lp) for raw, lp in step.top])


def tokenize_prompt(engine: TextEngine, text: str, *, add_bos: bool, special: bool) -> list[int]:
    """``engine.tokenize`` for a prompt, refusing at once a text that cannot fit the context whatever its
    tokens: no token stands for more characters than the vocabulary's longest piece, so a 10 MB prompt
    to a 4k-token model is a 400 in microseconds instead of after seconds of tokenizing."""
    longest = getattr(engine, "longest_piece", 0)
    if longest and len(text) > engine.n_ctx * longest:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {engine.n_ctx} tokens; the prompt has at least "
            f"{len(text) // longest} tokens. Shorten the prompt.", param="messages")
    return engine.tokenize(text, add_bos=add_bos, special=special)


def check_prompt_fits(engine: TextEngine, prompt: Sequence[int]) -> None:
    if not prompt:
        raise InvalidRequest("The prompt is empty: it has no tokens for the model to continue", param="prompt")
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
            raise InvalidRequest(f"Invalid grammar: {problem}", param=params.grammar_param)
    if params.logprobs is not None and not engine.supports_logprobs:
        raise NotImplementedForModel(f"The '{backend}' backend does not report logprobs", param="logprobs")
    for name in asked_sampling(params):
        if name not in engine.sampling:
            raise NotImplementedForModel(f"The '{backend}' backend cannot apply '{name}'; use a model with "
                                         "`backend: llama-cpp`", param=name)
    vocab = engine.n_vocab
    for token, _ in params.logit_bias:
        if token >= vocab:
            raise InvalidRequest(f"Invalid value for 'logit_bias': token id {token} is outside the model's "
                                 f"vocabulary of {vocab}", param="logit_bias")


def token_budget(n_ctx: int, prompt_len: int, params: GenParams) -> int:
    """How many tokens a choice may generate: ``max_tokens``, and never past the context."""
    budget = n_ctx - prompt_len
    return budget if params.max_tokens is None else min(budget, params.max_tokens)


class ChoiceText:
    """Turns one choice's token events into text: incremental UTF-8, stop strings, logprobs, counts."""

    def __init__(self, index: int, params: GenParams):
        self.index = index
        self.params = params
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stopper = StopMatcher(params.stop)
        self.count = 0
        self.done = False

    def feed(self, step: TokenStep) -> list[Piece | Finish]:
        """The events for one token; a reached stop string ends the choice (``done``)."""
        self.count += 1
        text, hit = self.stopper.feed(self.decoder.decode(step.piece))
        logprobs = [_token_logprob(step)] if self.params.logprobs is not None else []
        out: list[Piece | Finish] = [Piece(self.index, text, logprobs)] if text or logprobs else []
        if hit is not None:
            self.done = True
            out.append(Finish(self.index, "stop", self.count, stop_sequence=hit))
        return out

    def end(self, end: SeqEnd) -> list[Piece | Finish]:
        self.done = True
        tail, hit = self.stopper.feed(self.decoder.decode(b"", final=True))
        tail += "" if hit is not None else self.stopper.flush()
        out: list[Piece | Finish] = [Piece(self.index, tail)] if tail else []
        out.append(Finish(self.index, "stop" if hit is not None else end.reason, self.count, end.cached_tokens,
                          stop_sequence=hit))
        return out


def generate_sequentially(engine: Any, prompt: Sequence[int], params: Sequence[GenParams],
                          stream: TokenStream) -> None:
    """For engines that cannot batch: the choices one after another, on the engine's thread.

    ``engine.generate(prompt, params)`` yields token ids; end of generation and the budget are
    decided here, as the batching engine decides them in its own loop.
    """
    for index, choice in enumerate(params):
        budget = token_budget(engine.n_ctx, len(prompt), choice)
        count = 0
        reason = "stop" if budget > 0 else "length"  # an engine that ends by itself has met its end token
        if budget > 0 and stream.wanted(index):
            steps = engine.generate(prompt, choice)
            try:
                for token in steps:
                    if not stream.wanted(index) or (engine.is_eog(token) and not choice.ignore_eos):
                        break
                    stream.push(index, TokenStep(token, engine.token_bytes(token)))
                    count += 1
                    if count >= budget:
                        reason = "length"
                        break
            finally:
                steps.close()
        stream.push(index, SeqEnd(reason))


# ---------------------------------------------------------------------------------------------------------
# Request fields -> GenParams
# ---------------------------------------------------------------------------------------------------------

def _number(body: Mapping[str, Any], key: str, default: Any) -> Any:
    lo, hi = BOUNDS[key]
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidRequest(f"Invalid value for '{key}': must be a number", param=key)
    if not lo <= value <= hi:
        raise InvalidRequest(f"Invalid value for '{key}': {value} is not within [{lo:g}, {hi:g}]", param=key)
    return value


def _integer(body: Mapping[str, Any], key: str, default: Any, bounds: str | None = None) -> Any:
    lo, hi = BOUNDS[bounds or key]
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
                 logprobs: int | None = None, grammar: str | None = None,
                 grammar_param: str = "grammar", cache_scope: str = "") -> GenParams:
    """Model YAML ``parameters`` give the defaults; the request overrides them. ``cache_scope`` is whose
    cached prompts the request may reuse (its key's); a request's ``cache_salt`` (vLLM's field) narrows
    it further, so even one key's clients can keep their prompts apart."""
    merged = {**{k: v for k, v in defaults.items() if v is not None},
              **{k: v for k, v in body.items() if v is not None}}
    _refused(merged)
    base = GenParams()
    max_tokens = merged.get("max_completion_tokens", merged.get("max_tokens"))
    if max_tokens is not None:
        key = "max_completion_tokens" if "max_completion_tokens" in merged else "max_tokens"
        max_tokens = _integer({key: max_tokens}, key, None, bounds="max_tokens")
    seed = _integer(merged, "seed", None)
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise InvalidRequest("Invalid value for 'cache_salt': must be a string", param="cache_salt")
    return GenParams(
        max_tokens=max_tokens,
        temperature=float(_number(merged, "temperature", base.temperature)),
        top_p=float(_number(merged, "top_p", base.top_p)),
        top_k=int(_integer(merged, "top_k", base.top_k)),
        min_p=float(_number(merged, "min_p", base.min_p)),
        repeat_penalty=float(_number(merged, "repeat_penalty", base.repeat_penalty)),
        presence_penalty=float(_number(merged, "presence_penalty", base.presence_penalty)),
        frequency_penalty=float(_number(merged, "frequency_penalty", base.frequency_penalty)),
        seed=None if seed is None or seed < 0 else seed % (2**32),
        stop=parse_stop(body.get("stop", defaults.get("stop")), stopwords),
        logprobs=logprobs,
        grammar=grammar,
        grammar_param=grammar_param,
        ignore_eos=bool(merged.get("ignore_eos", False)),
        logit_bias=_logit_bias(merged.get("logit_bias")),
        typical_p=float(_number(merged, "typical_p", base.typical_p)),
        mirostat=int(_integer(merged, "mirostat", base.mirostat)),
        mirostat_tau=float(_number(merged, "mirostat_tau", base.mirostat_tau)),
        mirostat_eta=float(_number(merged, "mirostat_eta", base.mirostat_eta)),
        repeat_last_n=int(_integer(merged, "repeat_last_n", base.repeat_last_n)),
        cache_scope=cache_scope if not salt else f"{cache_scope}|{salt}",
    )


def _refused(merged: Mapping[str, Any]) -> None:
    """Fields clients send that this server cannot honour: a 400 naming them, never silence."""
    if merged.get("tfs_z", 1.0) != 1.0:
        raise InvalidRequest("'tfs_z' (tail-free sampling) is not supported: llama.cpp removed it; use 'min_p' "
                             "or 'typical_p'", param="tfs_z")
    if merged.get("n_keep", 0) != 0:
        raise InvalidRequest("'n_keep' only matters when a full context is shifted, which this server never does "
                             "(a prompt that does not fit gets 400 context_length_exceeded)", param="n_keep")


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` (-100 to 100), read in the model's own vocabulary."""
    if value is None:
        return ()
    if not isinstance(value, Mapping) or len(value) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"Invalid value for 'logit_bias': an object of at most {MAX_LOGIT_BIAS} token ids",
                             param="logit_bias")
    out = []
    for key, bias in value.items():
        if not str(key).isdigit() or isinstance(bias, bool) or not isinstance(bias, int | float) \
                or not -100 <= bias <= 100:
            raise InvalidRequest(f"Invalid value for 'logit_bias': {key!r}: {bias!r}; keys are token ids, values "
                                 "numbers from -100 to 100", param="logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def parse_n(body: Mapping[str, Any]) -> int:
    return int(_integer(body, "n", 1))
