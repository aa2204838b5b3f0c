"""Backend ``llama-cpp``: GGUF models on llama.cpp, many requests at once in one context.

Shaped after llama.cpp's own server. One context holds one copy of the weights and ``parallel``
slots (KV sequences) in a unified cache of ``context_size`` cells. A loop on the engine's own thread
(see ``runtime.EngineThread``) builds one batch per step: the next token of every generating slot plus
chunks of waiting prompts, so a long prompt never stalls the running streams for more than a chunk.
After the decode each slot samples with its own sampler chain (penalties, top-k, top-p, min-p,
temperature, seed); greedy slots take the arg-max directly. A grammar is checked on the token drawn,
through llguidance (see ``constraint``), never as a link of the chain.

Prompt cache: when a request finishes, its slot's cells are copied to host memory (llama.cpp's
sequence state, bounded by ``prompt_cache_mb``) and freed, as llama.cpp's server does with its RAM
cache; the cache therefore never crowds the context, and attention never spans idle requests' cells
(it covers every used cell up to the highest one, so idle caches left in place slowed every stream by
a tenth). A new request starts from the longest prefix of its prompt found there, or in a busy slot's
cells (that is how the ``n`` choices of one request share their prompt), and prefills only the rest:
a conversation's next turn computes only the new messages. A cancelled request's cells are dropped.
Prefixes are shared only within one ``cache_scope`` (an API key's, see ``principal``): a prompt computed
for another key is never reused, so neither ``cached_tokens`` nor the time to first token tells one user
what another one asked.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from localai_aio.backends import gbnf
from localai_aio.backends.base import (
    BackendError,
    ConstraintError,
    context_size_for,
    require_file,
    scrub,
    slots_for,
    threads_for,
)
from localai_aio.backends.constraint import Grammars, allowed, is_lark
from localai_aio.backends.gguf_info import GGUFInfo, read_gguf_info
from localai_aio.errors import ContextLengthExceeded, NotImplementedForModel, ServerBusy
from localai_aio.generation import EXTRA_SAMPLING, GenParams, SeqEnd, TokenStep, TokenStream, token_budget

if TYPE_CHECKING:
    from pathlib import Path

    from localai_aio.config import ModelConfig, ServerSettings

log = logging.getLogger(__name__)

# llama.cpp's messages go through one process-wide log callback, to this module's logger at debug level;
# a thread that wants the messages of its own call (a grammar it is checking) collects them here too.
_CAPTURE = threading.local()
#: Tokens decoded per step at most (running streams plus prompt chunks).
BATCH_TOKENS = 512
#: Token rates in /metrics are averaged over this many seconds.
RATE_WINDOW = 10.0
#: Host memory kept for finished requests' caches, in MB, unless a model's YAML sets ``prompt_cache_mb``.
PROMPT_CACHE_MB = 256
#: Shorter caches are not worth a copy: computing them again is as quick.
MIN_CACHED_TOKENS = 4


def extra_buffers(cfg: ModelConfig | None) -> bool:
    """Whether llama.cpp may repack the model's weights into its extra buffer types (AMX and others).

    Not by default on a CPU that advertises AMX: llama.cpp built for the native CPU then repacks into
    AMX buffers, and on virtual machines that advertise AMX without enabling its tile state the first
    prompt dies with an illegal instruction. A model's YAML ``extra_buffers`` decides otherwise.
    """
    if cfg is not None and cfg.option("extra_buffers") is not None:
        return bool(cfg.option("extra_buffers"))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return not any(line.startswith("flags") and " amx_tile" in line for line in info)
    except OSError:
        return True


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


class _Slot:
    """One KV sequence of the context: the tokens whose cells it holds, and the choice using it."""

    __slots__ = ("id", "tokens", "seq")

    def __init__(self, seq_id: int):
        self.id = seq_id
        self.tokens: list[int] = []
        self.seq: _Seq | None = None


class _Saved:
    """A finished request's cells, copied to host memory with the tokens they hold and whose they are."""

    __slots__ = ("tokens", "state", "last_used", "scope")

    def __init__(self, tokens: list[int], state: ctypes.Array, last_used: float, scope: str):
        self.tokens = tokens
        self.state = state
        self.last_used = last_used
        self.scope = scope


class _Seq:
    """One choice of one request, from the queue to its end."""

    __slots__ = ("stream", "index", "prompt", "params", "budget", "slot", "pending", "next_token", "sampler",
                 "matcher", "count", "cached", "row", "admitted", "awaiting", "tail", "shown")

    def __init__(self, stream: TokenStream, index: int, prompt: list[int], params: GenParams, budget: int):
        self.stream = stream
        self.index = index
        self.prompt = prompt
        self.params = params
        self.budget = budget
        self.slot: _Slot | None = None
        self.pending: list[int] = []  # prompt tokens still to decode
        self.next_token: int | None = None  # sampled, decoded in the next step
        self.sampler: Any = None
        self.matcher: Any = None  # the grammar's llguidance matcher, once the grammar applies
        self.count = 0
        self.cached = 0
        self.row = -1  # the batch row whose logits this choice samples after a decode
        self.admitted = 0.0
        # a lazy grammar's trigger, until the output has it; the output's last bytes, to find it in
        self.awaiting = params.grammar_trigger.encode("utf-8") if params.grammar_trigger else None
        self.tail = b""
        self.shown: dict[int, bytes] = {}  # special tokens this request writes out as text


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaCppEngine:
    #: Tokenizing, detokenizing and checking grammars only read the vocabulary, which llama.cpp never
    #: changes after the load: they may run on any thread (see ``registry.EngineHandle.read``).
    reads_anywhere = True
    supports_grammar = True
    supports_logprobs = True
    sampling = frozenset(EXTRA_SAMPLING)

    def __init__(self, cfg: ModelConfig, settings: ServerSettings):
        import llama_cpp

        self._ll = llama_cpp
        _install_log_callback(llama_cpp)
        path = require_file(cfg)
        self.info: GGUFInfo = read_gguf_info(path)
        self.name = cfg.name
        self.slots_total = slots_for(cfg, settings)
        threads = threads_for(cfg, settings)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = extra_buffers(cfg)
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if cfg.option("mmap", True) else \
            llama_cpp.LLAMA_LOAD_MODE_NONE
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
        if not self._model:
            raise BackendError(f"llama.cpp could not load the file {path.name}")
        self.ranks = self._ranks(cfg, path)  # a reranker: llama.cpp's rank pooling (see rerank)
        self.embeddings = bool(cfg.embeddings) and not self.ranks
        pooled = self.embeddings or self.ranks
        n_ctx = context_size_for(cfg, settings)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        # Pooled embeddings (and rank scores) need a whole input in one micro-batch.
        cparams.n_batch = cparams.n_ubatch = n_ctx if pooled else min(BATCH_TOKENS, n_ctx)
        cparams.n_seq_max = self.slots_total + (1 if pooled else 0)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = True
        cparams.no_perf = True
        if pooled:
            cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_RANK if self.ranks else \
                llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise BackendError(f"llama.cpp could not create a context of {n_ctx} tokens for {path.name}")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_ctx = n_ctx
        self.n_batch = int(cparams.n_batch)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._eog = {t for t in (llama_cpp.llama_vocab_eos(self._vocab), self.info.eos_id)
                     if t is not None and t >= 0}
        self._pieces: dict[int, bytes] = {}
        self.grammars = Grammars(self._grammar_tokenizer, self.n_vocab)
        self._candidates: np.ndarray | None = None  # see _draw
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._slots = [_Slot(i) for i in range(self.slots_total)]
        self._saved: list[_Saved] = []
        self._saved_bytes = 0
        self.cache_limit = int(float(cfg.option("prompt_cache_mb", PROMPT_CACHE_MB)) * 1024 * 1024)
        self._queue: deque[_Seq] = deque()
        self._active: list[_Seq] = []  # admitted, in admission order
        self._filled: list[tuple[_Seq, list[int], bool]] = []  # (choice, tokens added, from its prompt)
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "cached_tokens": 0}
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated) per step
        log.info("%s: %d slot(s) sharing %d context cells, %d thread(s)", self.name, self.slots_total, n_ctx,
                 threads)

    # -- vocabulary ---------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (self._ll.llama_token * size)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, size, add_bos, special)
        if n < 0:
            size = -n
            buf = (self._ll.llama_token * size)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, size, add_bos, special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[: max(n, 0)]
        return piece

    def _special_pieces(self, texts: Sequence[str]) -> dict[int, bytes]:
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
        return max(1, max(self._ll.llama_token_to_piece(self._vocab, t, buf, len(buf), 0, True)
                          for t in range(self.n_vocab)))

    def is_eog(self, token: int) -> bool:
        return token in self._eog or bool(self._ll.llama_vocab_is_eog(self._vocab, token))

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
            sampler = self._ll.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
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

        ll, vocab = self._ll, self._vocab
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

    # -- requests -----------------------------------------------------------------------------------------

    def start(self, prompt: Sequence[int], params: Sequence[GenParams], stream: TokenStream) -> None:
        """Queue one choice per ``params`` entry; the loop admits them first come, first served."""
        for index, choice in enumerate(params):
            budget = token_budget(self.n_ctx, len(prompt), choice)
            if budget <= 0:
                stream.push(index, SeqEnd("length"))
                continue
            self._queue.append(_Seq(stream, index, list(prompt), choice, budget))

    def load_report(self) -> dict[str, float]:
        """Slots, queue and token counters for /metrics (read from the event loop: plain values only)."""
        now = time.monotonic()
        recent = [r for r in list(self._recent) if now - r[0] <= RATE_WINDOW]
        return {"slots": self.slots_total, "busy": sum(1 for s in self._slots if s.seq is not None),
                "queued": len(self._queue), "prompt_cache_bytes": self._saved_bytes, **self.stats,
                "prompt_tokens_per_second": sum(r[1] for r in recent) / RATE_WINDOW,
                "generated_tokens_per_second": sum(r[2] for r in recent) / RATE_WINDOW}

    def busy(self) -> bool:
        return bool(self._active or self._queue)

    def step(self) -> None:
        self._drop_unwanted()
        self._admit()
        if not self._active:
            return
        rows = self._fill_batch()
        if not self._batch.n_tokens:  # nothing can move: never spin on it
            self.fail(RuntimeError("no choice in flight had a token to decode"))
            return
        code = self._ll.llama_decode(self._ctx, self._batch)
        while code == 1:  # no room: free what departed clients hold, else turn the newest request away
            self._undo_fill()
            if not (self._drop_unwanted() or self._shed_newest()) or not self._active:
                break
            rows = self._fill_batch()
            code = self._ll.llama_decode(self._ctx, self._batch)
        if code == 1 and not self._active:
            return
        if code != 0:
            raise RuntimeError(f"llama_decode failed with status {code}")
        prompt_tokens = sum(len(tokens) for _, tokens, from_prompt in self._filled if from_prompt)
        generated = self.stats["generated_tokens"]
        self._sample(rows)
        self.stats["prompt_tokens"] += prompt_tokens
        now = time.monotonic()
        self._recent.append((now, prompt_tokens, self.stats["generated_tokens"] - generated))
        while now - self._recent[0][0] > RATE_WINDOW:
            self._recent.popleft()

    def fail(self, exc: BaseException) -> None:
        """A step failed: every request in flight gets the error and the cache starts over."""
        for seq in self._active + list(self._queue):
            seq.stream.fail(exc)
            self._release(seq, keep_cache=False)
        self._queue.clear()
        self._active.clear()
        self._ll.llama_memory_clear(self._mem, True)
        for slot in self._slots:
            slot.tokens = []
        self._saved.clear()
        self._saved_bytes = 0

    # -- the loop's parts ---------------------------------------------------------------------------------

    def _drop_unwanted(self) -> bool:
        """Release the choices nobody waits for any more; whether there were any in flight."""
        gone = [s for s in self._active if not s.stream.wanted(s.index)]
        for seq in gone:
            self._release(seq, keep_cache=not seq.stream.cancelled)  # a stop string's end keeps the cache
        if any(not s.stream.wanted(s.index) for s in self._queue):
            self._queue = deque(s for s in self._queue if s.stream.wanted(s.index))
        return bool(gone)

    def _admit(self) -> None:
        while self._queue:
            seq = self._queue[0]
            free = [s for s in self._slots if s.seq is None]
            if not free:
                return
            sibling_prefilling = any(o.stream is seq.stream and o.pending for o in self._active)
            if sibling_prefilling:
                return  # wait one more step and share the prompt's cells instead of computing them twice
            self._queue.popleft()
            try:
                self._place(seq, free)
            except Exception as exc:  # this request alone fails (e.g. a sampler llama.cpp refuses)
                seq.stream.fail(exc)
                self._release(seq, keep_cache=False)

    def _place(self, seq: _Seq, free: list[_Slot]) -> None:
        """Start ``seq`` in a free slot from the longest prefix of its prompt that is already computed."""
        ll, prompt, slot = self._ll, seq.prompt, free[0]
        limit = len(prompt) - 1  # at least one prompt token is decoded, for the logits to sample from
        scope = seq.params.cache_scope
        donor = max((s for s in self._slots if s.seq is not None and s.seq.params.cache_scope == scope),
                    default=None, key=lambda s: _common_prefix(s.tokens, prompt))
        shared = min(_common_prefix(donor.tokens, prompt), limit) if donor is not None else 0
        saved = max((e for e in self._saved if e.scope == scope), default=None,
                    key=lambda e: _common_prefix(e.tokens, prompt))
        restored = min(_common_prefix(saved.tokens, prompt), limit) if saved is not None else 0
        keep = 0
        if max(shared, restored) >= MIN_CACHED_TOKENS:
            if shared >= restored:
                ll.llama_memory_seq_cp(self._mem, donor.id, slot.id, 0, shared)
                keep = shared
            elif ll.llama_state_seq_set_data(self._ctx, saved.state, len(saved.state), slot.id):
                ll.llama_memory_seq_rm(self._mem, slot.id, restored, -1)
                saved.last_used = time.monotonic()
                keep = restored
            else:  # no room for the copy now: compute the prompt instead
                ll.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
        slot.tokens = prompt[:keep]
        seq.slot, slot.seq = slot, seq
        seq.pending = prompt[keep:]
        seq.cached = keep
        seq.admitted = time.monotonic()
        seq.sampler = self._sampler_for(seq.params)
        if seq.params.grammar is not None and seq.awaiting is None:
            seq.matcher = self.grammars.matcher(seq.params.grammar, seq.params.grammar_param)
        seq.shown = self._special_pieces(seq.params.shown_tokens)
        self.stats["cached_tokens"] += keep
        self._active.append(seq)

    def _fill_batch(self) -> list[_Seq]:
        """Fill the batch: one token per generating choice, then prompt chunks. Returns the choices that
        sample after this decode, each with ``row`` set; ``_undo_fill`` can take the batch back."""
        batch = self._batch
        n = 0
        rows: list[_Seq] = []
        self._filled = []

        def add(seq: _Seq, token: int, logits: bool) -> None:
            nonlocal n
            slot = seq.slot
            batch.token[n] = token
            batch.pos[n] = len(slot.tokens)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.id
            batch.logits[n] = logits
            slot.tokens.append(token)
            if logits:
                seq.row = n
                rows.append(seq)
            n += 1

        for seq in self._active:
            if seq.next_token is not None:
                add(seq, seq.next_token, True)
                self._filled.append((seq, [seq.next_token], False))
                seq.next_token = None
        for seq in self._active:
            if n >= self.n_batch:
                break
            if seq.pending:
                take = seq.pending[: self.n_batch - n]
                del seq.pending[: len(take)]
                for i, token in enumerate(take):
                    add(seq, token, not seq.pending and i == len(take) - 1)
                self._filled.append((seq, take, True))
        batch.n_tokens = n
        return rows

    def _undo_fill(self) -> None:
        """Take back what ``_fill_batch`` added (the decode found no room), so it can be built again."""
        for seq, tokens, from_prompt in self._filled:
            if seq.slot is not None:
                del seq.slot.tokens[len(seq.slot.tokens) - len(tokens):]
            if from_prompt:
                seq.pending[:0] = tokens
            else:
                seq.next_token = tokens[0]
        self._filled = []
        self._batch.n_tokens = 0

    def _sample(self, rows: list[_Seq]) -> None:
        ll = self._ll
        for seq in rows:
            if seq.matcher is not None:
                token = self._constrained(seq)
                if token is None:
                    continue
            elif seq.sampler is None:
                token = int(self._logits(seq).argmax())
            else:
                token = ll.llama_sampler_sample(seq.sampler, self._ctx, seq.row)
            if self.is_eog(token) and not seq.params.ignore_eos:
                self._end(seq, "stop")
                continue
            seq.count += 1
            self.stats["generated_tokens"] += 1
            piece = seq.shown.get(token) or self.token_bytes(token)
            seq.stream.push(seq.index, self._step_for(seq, token, piece))
            if seq.awaiting is not None and not self._watch_trigger(seq, piece):
                continue
            if seq.count >= seq.budget:
                self._end(seq, "length")
            else:
                seq.next_token = token

    def _logits(self, seq: _Seq) -> np.ndarray:
        return np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, seq.row), shape=(self.n_vocab,))

    def _constrained(self, seq: _Seq) -> int | None:
        """The next token of a choice held by a grammar, or None when the choice ended here.

        Sample first, then ask the matcher about that one token; only a refused token costs the mask of
        the whole vocabulary and a second draw among the allowed tokens. A grammar that allows no token
        at all ends the request with an error; the engine and every other request go on.
        """
        matcher = seq.matcher
        if matcher.is_error():  # e.g. no text of this vocabulary can start the grammar
            self._refuse(seq, matcher.get_error())
            return None
        if matcher.is_stopped():  # complete: nothing may follow
            self._end(seq, "stop")
            return None
        logits = self._logits(seq)
        token = self._draw(seq, logits)
        if matcher.try_consume_tokens([token]) != 1:  # refused, and the matcher is as it was
            mask = allowed(matcher, self.n_vocab)
            if matcher.is_error() or not mask.any():
                self._refuse(seq, matcher.get_error())
                return None
            logits[~mask] = -np.inf
            token = self._draw(seq, logits)
            if not matcher.consume_token(token):
                self._refuse(seq, matcher.get_error() or "the grammar refused the next token")
                return None
        if seq.sampler is not None:
            self._ll.llama_sampler_accept(seq.sampler, token)
        return token

    def _draw(self, seq: _Seq, logits: np.ndarray) -> int:
        """A token from ``logits`` through the choice's sampler chain, without telling the chain (the
        grammar may refuse it): llama.cpp's candidate array over numpy's memory, sampled in place."""
        if seq.sampler is None:
            return int(logits.argmax())
        ll = self._ll
        if self._candidates is None:
            self._candidates = np.zeros(self.n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        candidates = self._candidates
        candidates["id"] = np.arange(self.n_vocab, dtype=np.int32)
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = ll.llama_token_data_array(candidates.ctypes.data_as(ll.llama_token_data_p), self.n_vocab, -1, False)
        ll.llama_sampler_apply(seq.sampler, ctypes.byref(array))
        if not 0 <= array.selected < array.size:  # no finite candidate was left: never read outside the array
            return int(logits.argmax())
        return int(array.data[array.selected].id)

    def _refuse(self, seq: _Seq, why: str) -> None:
        """End a request whose constraint cannot go on: its client gets the reason, its slot is freed."""
        log.info("%s: a request's constraint stopped: %s", self.name, why)
        reason = why.replace("<non-verbose/>", "").strip()
        if not reason or reason == "NoExtensionBias":  # llguidance's name for "no token can follow"
            reason = "no token of this model's vocabulary can continue the output"
        seq.stream.fail(ConstraintError(f"The output constraint cannot be continued: {reason}",
                                        seq.params.grammar_param))
        self._release(seq, keep_cache=False)

    def _watch_trigger(self, seq: _Seq, piece: bytes) -> bool:
        """A lazy grammar starts once the output has its trigger (a tool call's opening marker): from
        there on a matcher holds the rest of the output. False when the choice ended here.

        The trigger is looked for here, in Python: text after the trigger in the same token belongs to
        no grammar, so then the output stays free and the answer's parser judges it.
        """
        trigger = seq.awaiting
        seq.tail = (seq.tail + piece)[-(len(trigger) + 16):]
        at = seq.tail.find(trigger)
        if at < 0:
            return True
        seq.awaiting = None
        if seq.tail[at + len(trigger):].strip():
            return True
        try:
            seq.matcher = self.grammars.matcher(seq.params.grammar, seq.params.grammar_param)
        except ConstraintError as exc:
            seq.stream.fail(exc)
            self._release(seq, keep_cache=False)
            return False
        return True

    def _step_for(self, seq: _Seq, token: int, piece: bytes) -> TokenStep:
        top_n = seq.params.logprobs
        if top_n is None:
            return TokenStep(token, piece)
        logits = self._logits(seq)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        top: tuple[tuple[bytes, float], ...] = ()
        if top_n:
            best = np.argpartition(-logprobs, min(top_n, len(logprobs) - 1))[:top_n]
            best = best[np.argsort(-logprobs[best])]
            top = tuple((self.token_bytes(int(t)), float(logprobs[t])) for t in best)
        return TokenStep(token, piece, float(logprobs[token]), top)

    def _end(self, seq: _Seq, reason: str) -> None:
        self._release(seq, keep_cache=True)  # first: once the client hears of the end, the slot is free
        seq.stream.push(seq.index, SeqEnd(reason, seq.cached))

    def _release(self, seq: _Seq, *, keep_cache: bool) -> None:
        if seq in self._active:
            self._active.remove(seq)
        slot, seq.slot = seq.slot, None
        if slot is not None:
            slot.seq = None
            if keep_cache:
                self._save(slot, seq.params.cache_scope)
            self._ll.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
            slot.tokens = []
        if seq.sampler:
            self._ll.llama_sampler_free(seq.sampler)
            seq.sampler = None
        seq.matcher = None

    def _save(self, slot: _Slot, scope: str) -> None:
        """Copy a finished slot's cells to host memory (least recently used copies go first)."""
        ll, tokens = self._ll, slot.tokens
        if len(tokens) < MIN_CACHED_TOKENS or not self.cache_limit:
            return
        size = ll.llama_state_seq_get_size(self._ctx, slot.id)
        if size > self.cache_limit:
            return
        state = (ctypes.c_uint8 * size)()
        if ll.llama_state_seq_get_data(self._ctx, state, size, slot.id) != size:
            return
        # A copy whose tokens this one extends holds nothing more.
        for old in [e for e in self._saved if e.scope == scope and _common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self._forget(old)
        self._saved.append(_Saved(list(tokens), state, time.monotonic(), scope))
        self._saved_bytes += size
        while self._saved_bytes > self.cache_limit:
            self._forget(min(self._saved, key=lambda e: e.last_used))

    def _forget(self, saved: _Saved) -> None:
        self._saved.remove(saved)
        self._saved_bytes -= len(saved.state)

    def _shed_newest(self) -> bool:
        if len(self._active) <= 1:
            return False
        seq = max(self._active, key=lambda s: s.admitted)
        seq.stream.fail(ServerBusy(f"Model '{self.name}' has no room left in its context cache "
                                   f"({self.n_ctx} tokens shared by {len(self._active)} requests); retry later",
                                   retry_after=1))
        self._release(seq, keep_cache=False)
        return True

    # -- sampling -----------------------------------------------------------------------------------------

    def _sampler_for(self, params: GenParams) -> Any:
        """A llama.cpp sampler chain in llama-cpp-python's order, or None for plain greedy decoding (the
        arg-max of the logits, without building the candidate list of the whole vocabulary)."""
        ll = self._ll
        penalties = (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) != (1.0, 0.0, 0.0)
        greedy = params.temperature <= 0
        if greedy and not penalties and not params.logit_bias:
            return None
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if params.logit_bias:
            biases = (ll.llama_logit_bias * len(params.logit_bias))(
                *[ll.llama_logit_bias(token, bias) for token, bias in params.logit_bias])
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_logit_bias(self.n_vocab, len(biases), biases))
        if penalties:
            last_n = self.n_ctx if params.repeat_last_n < 0 else min(params.repeat_last_n, self.n_ctx)
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(
                self.n_vocab, last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty))
        if greedy:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        elif params.mirostat:  # Mirostat steers perplexity itself, in place of top-k, top-p and min-p
            seed = params.seed if params.seed is not None else random.randrange(2**31)
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_mirostat(
                self.n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100) if params.mirostat == 1 else
                ll.llama_sampler_init_mirostat_v2(seed, params.mirostat_tau, params.mirostat_eta))
        else:
            seed = params.seed if params.seed is not None else random.randrange(2**31)
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(params.top_k))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_typical(params.typical_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(params.min_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    # -- embeddings (models with `embeddings: true`) ------------------------------------------------------

    @property
    def dimensions(self) -> int:
        return int(self._ll.llama_model_n_embd(self._model))

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    @property
    def max_length(self) -> int:
        return self.n_ctx

    def embedding_tokens(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t, add_bos=True, special=False)[: self.n_ctx] for t in texts]

    def embed(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Mean-pooled, normalized embeddings, one input at a time in a sequence kept for them."""
        if not self.embeddings:
            raise BackendError(f"model {self.name!r} is not configured for embeddings (set `embeddings: true`)")
        out = np.zeros((len(token_lists), self.dimensions), dtype=np.float32)
        self._ll.llama_set_embeddings(self._ctx, True)
        try:
            for row, tokens in enumerate(token_lists):
                out[row] = self._pooled(list(tokens)[: self.n_batch], self.dimensions, "embed")
        finally:
            self._ll.llama_set_embeddings(self._ctx, False)
        out /= np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
        return out

    def _pooled(self, tokens: Sequence[int], width: int, what: str) -> np.ndarray:
        """One input decoded alone in the sequence kept for pooled outputs; its ``width`` pooled floats.
        The sequence's cells are freed whatever happens, so a failed input leaves nothing behind."""
        ll, batch, seq_id = self._ll, self._batch_for_embeddings(), self.slots_total
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0], batch.logits[i] = seq_id, True
        batch.n_tokens = len(tokens)
        try:
            code = ll.llama_decode(self._ctx, batch)
            pooled = ll.llama_get_embeddings_seq(self._ctx, seq_id) if code == 0 else None
            if not pooled:
                raise BackendError(f"llama.cpp could not {what} an input (status {code})")
            return np.ctypeslib.as_array(pooled, shape=(width,)).copy()
        finally:
            ll.llama_memory_seq_rm(self._mem, seq_id, -1, -1)

    def _batch_for_embeddings(self) -> Any:
        if getattr(self, "_embed_batch", None) is None:
            self._embed_batch = self._ll.llama_batch_init(self.n_batch, 0, 1)
        return self._embed_batch

    # -- reranking (cross-encoders: llama.cpp's rank pooling) ---------------------------------------------

    def _ranks(self, cfg: ModelConfig, path: Path) -> bool:
        """Whether this model scores (query, document) pairs with llama.cpp's rank pooling: its YAML says
        ``pooling: rank``, or says no ``pooling`` and the GGUF's ``<arch>.pooling_type`` is rank (4), as
        llama.cpp's converter writes it for sequence-classification models. The file must hold a
        classification head (``cls`` or ``cls.output``): without one, llama.cpp's rank graph quietly returns
        the first token's hidden state, which is no score."""
        wanted = cfg.option("pooling")
        if wanted is None:
            found = self._meta(f"{self.info.architecture}.pooling_type")
            wanted = "rank" if found == str(self._ll.LLAMA_POOLING_TYPE_RANK) else None
        if str(wanted).lower() != "rank":
            return False
        if not _has_rank_head(path):
            self._ll.llama_model_free(self._model)
            raise BackendError("rank pooling needs a classification head (cls.weight or cls.output.weight), "
                               "which this GGUF does not have")
        return True

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_model_meta_val_str(self._model, key.encode("utf-8"), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def rank_limit(self) -> int:
        """Most tokens one pair may take: one micro-batch, and no more positions than the model was trained
        with (BERT-style models have a table of positions and nothing past it)."""
        trained = int(self._ll.llama_model_n_ctx_train(self._model))
        return min(self.n_batch, trained) if trained > 0 else self.n_batch

    def rank_tokens(self, query: str, document: str) -> list[int]:
        """One pair as llama.cpp's server builds it (``format_prompt_rerank``): the GGUF's ``rerank``
        template with ``{query}`` and ``{document}`` filled in, when it has one (Qwen3 rerankers); else
        [BOS]query[EOS][SEP]document[EOS], each special token where the vocabulary adds it (``add_bos``,
        ``add_eos``, ``add_sep``) and EOS falling back to SEP, as the server does. A pair longer than the
        model takes is cut longest side first, as cross-encoders' tokenizers truncate; a template's prompt
        cannot be cut without losing the part the score is read after, so it is refused."""
        ll, vocab, limit = self._ll, self._vocab, self.rank_limit
        template = ll.llama_model_chat_template(self._model, b"rerank")
        if template:
            fill = {"{query}": query, "{document}": document}  # one pass: a query's "{document}" stays text
            prompt = re.sub(r"\{query\}|\{document\}", lambda m: fill[m.group(0)], template.decode("utf-8", "replace"))
            tokens = self.tokenize(prompt, add_bos=False, special=True)
            if len(tokens) > limit:
                raise ContextLengthExceeded(f"A document and the query take {len(tokens)} tokens; this model "
                                            f"takes {limit}", param="documents")
            return tokens
        eos = ll.llama_vocab_eos(vocab)
        eos = eos if eos >= 0 else ll.llama_vocab_sep(vocab)
        head = [ll.llama_vocab_bos(vocab)] if ll.llama_vocab_get_add_bos(vocab) else []
        middle = ([eos] if ll.llama_vocab_get_add_eos(vocab) else []) + \
            ([ll.llama_vocab_sep(vocab)] if ll.llama_vocab_get_add_sep(vocab) else [])
        tail = [eos] if ll.llama_vocab_get_add_eos(vocab) else []
        q, d = (self.tokenize(text, add_bos=False, special=False) for text in (query, document))
        room = max(0, limit - len(head) - len(middle) - len(tail))
        while len(q) + len(d) > room:
            if len(q) > len(d):
                q.pop()
            else:
                d.pop()
        return head + q + middle + d + tail

    def rerank(self, query: str, documents: Sequence[str]) -> list[tuple[float, int]]:
        """Each document's relevance to the query in [0, 1], in order, with the tokens its pair took.

        Rank pooling gives the classification head's raw output, a logit, which llama.cpp's server returns
        as it is. Clients of /v1/rerank are written for Jina's and Cohere's APIs, whose relevance_score is
        in [0, 1], as sentence-transformers' CrossEncoder and text-embeddings-inference give it for a
        one-logit head: sigmoid(logit), which keeps the order and makes scores of different requests (and
        of onnx-rerank) comparable. A head with several outputs scores with the last, as onnx-rerank does.
        """
        if not self.ranks:
            raise NotImplementedForModel(f"Model '{self.name}' does not rerank: it has no rank pooling (a "
                                         "cross-encoder GGUF needs `pooling: rank` in its config)", param="model")
        pairs = [self.rank_tokens(query, document) for document in documents]
        width = max(1, int(self._ll.llama_model_n_cls_out(self._model)))
        logits = np.zeros(len(pairs), dtype=np.float64)
        self._ll.llama_set_embeddings(self._ctx, True)
        try:
            for row, tokens in enumerate(pairs):
                logits[row] = self._pooled(tokens, width, "score")[-1]
        finally:
            self._ll.llama_set_embeddings(self._ctx, False)
        scores = 0.5 * (1.0 + np.tanh(logits / 2))  # sigmoid, without overflow for large logits
        return [(float(score), len(tokens)) for score, tokens in zip(scores, pairs, strict=True)]

    def close(self) -> None:
        ll = self._ll
        for seq in self._active + list(self._queue):
            seq.stream.fail(BackendError(f"model {self.name!r} was unloaded"))
            if seq.sampler:
                ll.llama_sampler_free(seq.sampler)
        self._active.clear()
        self._queue.clear()
        for batch in (self._batch, getattr(self, "_embed_batch", None)):
            if batch is not None:
                ll.llama_batch_free(batch)
        ll.llama_free(self._ctx)
        ll.llama_model_free(self._model)


def _has_rank_head(path: Path) -> bool:
    """Whether a GGUF holds a classification head, from its tensor names (llama.cpp has no call that says)."""
    from gguf import GGUFReader

    return any(t.name in ("cls.weight", "cls.output.weight") for t in GGUFReader(str(path)).tensors)


def load(cfg: ModelConfig, settings: ServerSettings) -> LlamaCppEngine:
    try:
        return LlamaCppEngine(cfg, settings)
    except (ValueError, RuntimeError) as exc:
        raise BackendError(f"llama.cpp could not load the file: {scrub(exc, require_file(cfg))}") from None
