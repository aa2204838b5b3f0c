"""Constrained decoding on llguidance: grammars checked token by token, and never a process abort.

llama.cpp's grammar sampler aborts the whole process when a grammar leaves no candidate token
(``llama-grammar.cpp: fatal error``, ggml-org/llama.cpp#12597): one request with a schema only an
untokenizable character matches ended every stream of every model. Applied as a link of the sampler
chain it also filters the whole vocabulary on every token, which halved the decode rate of structured
answers. llguidance is made for this: an error (a grammar it cannot compile, a state no token can
follow, a step over its budget) is a state the matcher reports, not an abort, and it checks one token
in microseconds. So the engine samples first and asks the matcher about the chosen token only; the
whole vocabulary's mask is computed only when that token is refused, as llama.cpp's own server does
(common/sampling.cpp). The result is the same distribution: a token the grammar allows is kept with its
own probability, and a refused draw is redrawn among the allowed tokens.

Grammars come in llguidance's Lark dialect (what ``text.tools`` builds, with the request's JSON schemas
compiled by llguidance's JSON compiler) or as llama.cpp GBNF, the ``grammar`` field LocalAI's users
write, converted to Lark by llguidance. Compiling is the slow part (milliseconds for a few tools, more for
large schemas): it happens when a request is checked, off the engine's decode thread, and the compiled
matcher is kept per grammar text, so a request only copies it.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from localai_aio.backends.base import ConstraintError

if TYPE_CHECKING:
    import llguidance

#: Compiled grammars kept per model (an agent sends the same tools on every turn).
CACHE_SIZE = 64


def is_lark(grammar: str) -> bool:
    """Whether a grammar is already in llguidance's Lark dialect (else it is GBNF)."""
    from llguidance.gbnf_to_lark import is_lark_syntax

    return is_lark_syntax(grammar)


def _message(text: str) -> str:
    """llguidance's message on one line, without the listing of the grammar it appends and the position
    it starts with (``at 2(8): ``): the client wrote the grammar; the reason is what it needs."""
    kept = []
    for line in text.strip().splitlines():
        if re.match(r"\s*\d+ \| ", line):
            break
        if line.strip(" ^"):
            kept.append(line.strip())
    message = re.sub(r"^at \d+\(\d+\): ", "", " ".join(kept))
    return message or "the grammar cannot be used"


class Grammars:
    """One model's llguidance tokenizer and its compiled grammars; safe to use from several threads.

    The tokenizer is built from the model's vocabulary on first use (about a second for 50k tokens),
    under a lock, so requests checked at once build it once.
    """

    def __init__(self, build_tokenizer: Callable[[], llguidance.LLTokenizer]):
        self._build_tokenizer = build_tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, llguidance.LLMatcher | str] = OrderedDict()

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build_tokenizer()
            return self._tokenizer

    def check(self, grammar: str) -> str | None:
        """None when ``grammar`` compiles, else why it does not (the result is kept either way)."""
        compiled = self._compile(grammar)
        return compiled if isinstance(compiled, str) else None

    def matcher(self, grammar: str, param: str = "grammar") -> llguidance.LLMatcher:
        """A fresh matcher at the start of ``grammar``: a copy of the compiled one."""
        compiled = self._compile(grammar)
        if isinstance(compiled, str):
            raise ConstraintError(f"Invalid grammar: {compiled}", param)
        return compiled.deep_copy()

    def _compile(self, grammar: str) -> llguidance.LLMatcher | str:
        with self._lock:
            found = self._compiled.get(grammar)
            if found is not None:
                self._compiled.move_to_end(grammar)
                return found
        compiled = self._build(grammar)
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def _build(self, grammar: str) -> llguidance.LLMatcher | str:
        from llguidance import LLMatcher, LLParserLimits, grammar_from

        try:
            source = grammar_from("lark" if is_lark(grammar) else "gbnf", grammar)
        except ValueError as exc:
            return _message(str(exc))
        matcher = LLMatcher(self.tokenizer(), source, log_level=0, limits=LLParserLimits(verbose_errors=False))
        return _message(matcher.get_error()) if matcher.is_error() else matcher


def allowed(matcher: llguidance.LLMatcher, n_vocab: int) -> np.ndarray:
    """The tokens the matcher allows next, as a boolean array over the vocabulary."""
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    return np.unpackbits(bits, bitorder="little")[:n_vocab].astype(bool)
