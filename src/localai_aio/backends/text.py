"""The text engine contract: what a GGUF backend takes (``GenParams``), what it reports (``TokenStep``,
``SeqEnd`` through a ``TokenStream``) and the methods it offers (``TextEngine``).

Engines only produce token ids (and, when asked, log-probabilities). Turning them into the text users
see - UTF-8, stop strings, finish reasons, counts - belongs to the layer above (``text.choices``), and
turning request JSON into ``GenParams`` to the request side (``api.sampling``), so no engine ever reads a
request field or knows an HTTP error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from localai_aio.backends.gguf_info import GGUFInfo


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

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def check_grammar(self, grammar: str) -> str | None: ...

    def start(self, prompt: Sequence[int], params: Sequence[GenParams], stream: TokenStream) -> None:
        """Generate one choice per ``params`` entry for ``prompt``, reporting into ``stream``. A batching
        engine queues the work and returns; a sequential one generates before it returns."""


#: Sampling beyond temperature, top-k, top-p and the repeat penalty, by GenParams field: an engine names
#: the ones it applies (``TextEngine.sampling``); a request that sets another one gets 400 naming it.
EXTRA_SAMPLING = ("min_p", "presence_penalty", "frequency_penalty", "logit_bias", "typical_p", "mirostat",
                  "repeat_last_n")


def asked_sampling(params: GenParams) -> list[str]:
    """The extra sampling fields ``params`` sets to something other than their neutral default."""
    neutral = GenParams()
    return [name for name in EXTRA_SAMPLING if getattr(params, name) != getattr(neutral, name)]


def token_budget(n_ctx: int, prompt_len: int, params: GenParams) -> int:
    """How many tokens a choice may generate: ``max_tokens``, and never past the context."""
    budget = n_ctx - prompt_len
    return budget if params.max_tokens is None else min(budget, params.max_tokens)


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
