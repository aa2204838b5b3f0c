"""A GGUF model's vocabulary: tokens to text and back, end-of-generation tokens, grammar checks.

Everything here only reads the vocabulary, which llama.cpp never changes after the load, so it may run
on any thread (see ``registry.EngineHandle.read``): keep it free of the scheduler's state.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Sequence
from typing import Any

from localai_aio.backends import gbnf
from localai_aio.backends.constraint import Grammars, is_lark

log = logging.getLogger(__name__)

# llama.cpp's messages go through one process-wide log callback, to this module's logger at debug level;
# a thread that wants the messages of its own call (a grammar it is checking) collects them here too.
_CAPTURE = threading.local()


def _install_log_callback(llama_cpp: Any) -> None:
    if getattr(llama_cpp, "_localai_log_callback", None) is not None:
        return

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, _user_data: Any) -> None:
        message = text.decode("utf-8", "replace").rstrip()
        log.debug("llama.cpp: %s", message)
        lines = getattr(_CAPTURE, "lines", None)
        if lines is not None and message:
            lines.append(message)

    llama_cpp._localai_log_callback = on_log  # the callback must live as long as llama.cpp may call it
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))


class Vocabulary:
    """One loaded model's vocabulary (``ll`` is the ``llama_cpp`` module, ``eos_id`` the GGUF header's)."""

    def __init__(self, ll: Any, model: Any, eos_id: int | None):
        self._ll = ll
        self.model = model
        self.vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self._eog = {t for t in (ll.llama_vocab_eos(self.vocab), eos_id) if t is not None and t >= 0}
        self._pieces: dict[int, bytes] = {}
        self.grammars = Grammars(self._grammar_tokenizer)

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (self._ll.llama_token * size)()
        n = self._ll.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, special)
        if n < 0:
            size = -n
            buf = (self._ll.llama_token * size)()
            n = self._ll.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = self._ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[: max(n, 0)]
        return piece

    def special_pieces(self, texts: Sequence[str]) -> dict[int, bytes]:
        """The ids of special tokens that are these texts: markers a client never sees as text unless
        they are written out (llama.cpp hides control tokens in output, like a tool call's opener)."""
        pieces = {}
        for text in texts:
            ids = self.tokenize(text, add_bos=False, special=True)
            if len(ids) == 1:
                pieces[ids[0]] = text.encode("utf-8")
        return pieces

    @functools.cached_property
    def longest_piece(self) -> int:
        """The most characters one token stands for (special tokens written out included): a text longer
        than ``n_ctx`` times this cannot fit the context, whatever its tokens."""
        buf = ctypes.create_string_buffer(16 * 1024)
        return max(1, max(self._ll.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, True)
                          for t in range(self.n_vocab)))

    def is_eog(self, token: int) -> bool:
        return token in self._eog or bool(self._ll.llama_vocab_is_eog(self.vocab, token))

    def check_grammar(self, grammar: str) -> str | None:
        """None when the grammar can constrain this model's output, else why not. Compiles it (kept for
        the request): call it off the decode thread. GBNF is first judged as llama.cpp judges it, so
        the grammars LocalAI's users write are accepted and refused as llama.cpp's server does."""
        if not is_lark(grammar):
            problem = self._gbnf_problem(grammar)
            if problem:
                return problem
        return self.grammars.check(grammar)

    def _gbnf_problem(self, grammar: str) -> str | None:
        """The syntax is checked first (llama.cpp would only print that to stderr), then llama.cpp's own
        judgement, from the messages it logs on this thread. Parsing never samples, so it cannot abort."""
        problem = gbnf.syntax_error(grammar)
        if problem:
            return problem
        _CAPTURE.lines = []
        try:
            sampler = self._ll.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
        finally:
            logged, _CAPTURE.lines = _CAPTURE.lines, None
        if sampler:
            self._ll.llama_sampler_free(sampler)
            return None
        return logged[0] if logged else "llama.cpp could not parse the grammar"

    def _grammar_tokenizer(self) -> Any:
        """llguidance's view of the vocabulary: each token's bytes, control tokens marked special (so no
        grammar spells them by accident) and every end-of-generation token as an end. Tokens a vocabulary
        merely defines (a tool format's ``<tool_call>``) stay text, as llama.cpp's grammar saw them."""
        from llguidance import LLTokenizer

        ll, vocab = self._ll, self.vocab
        buf = ctypes.create_string_buffer(16 * 1024)
        pieces, ends = [], []
        for token in range(self.n_vocab):
            n = ll.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
            piece = buf.raw[:max(n, 0)]
            if ll.llama_vocab_get_attr(vocab, token) & ll.LLAMA_TOKEN_ATTR_CONTROL:
                piece = b"\xff" + piece
            pieces.append(piece)
            if self.is_eog(token):
                ends.append(token)
        tokenize = ctypes.cast(ll.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
        return LLTokenizer.from_llamacpp(tokens=pieces, vocab_ptr=vocab, tokenize_fptr=tokenize,
                                         eos_token=ends or list(self._eog), slices=None)
