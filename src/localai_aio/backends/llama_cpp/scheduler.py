"""Continuous batching: many requests' choices in one context, one batch per step.

Shaped after llama.cpp's own server. The context has ``parallel`` slots (KV sequences) in a unified cache
of ``context_size`` cells. Each choice of a request goes through named states::

    QUEUED -> PREFILLING -> GENERATING -> DONE

A step (on the engine's own thread, see ``runtime.EngineThread``) admits queued choices into free slots
(starting from the longest prefix of the prompt already computed: a busy slot's cells, which is how the
``n`` choices of one request share their prompt, or a finished request's copy in the prompt cache), then
``plan`` decides the batch: the next token of every generating choice plus chunks of waiting prompts, so a
long prompt never stalls the running streams for more than a chunk. ``execute`` writes and decodes it and
only then moves the slots on, so when the cache has no room left nothing needs taking back: departed
clients' cells are freed, or else the newest request is turned away (503, retry later), and the step plans
again. After the decode each choice whose logits were computed samples its next token (see ``sampling``).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

from localai_aio import cpu_budget
from localai_aio.backends.base import BackendError, ConstraintError, EngineBusy
from localai_aio.backends.llama_cpp.prompt_cache import MIN_CACHED_TOKENS, PromptCache, common_prefix
from localai_aio.backends.llama_cpp.sampling import Picker, Sampling
from localai_aio.backends.llama_cpp.vocabulary import Vocabulary
from localai_aio.backends.text import GenParams, SeqEnd, TokenStream, token_budget

#: Token rates in /metrics are averaged over this many seconds.
RATE_WINDOW = 10.0
#: While other choices are generating, a step's prompt tokens may add at most this many times the time of
#: a step of generated tokens alone. Every stream waits for the whole step, and a prompt token costs far
#: more than a generated one (here ~4 ms each at the end of a 4k-token prompt, against ~8 ms for a whole
#: step of one stream): chunks are sized from the measured costs, so a long prompt beside streams moves
#: as fast as their gaps allow, and in full chunks once nothing else is generating.
PREFILL_STALL = 1.5
#: Bounds of a prompt chunk beside generating choices (the upper one until costs have been measured).
PREFILL_CHUNK_MIN, PREFILL_CHUNK_MAX = 4, 64


class State(enum.Enum):
    QUEUED = "queued"  # waiting for a free slot
    PREFILLING = "prefilling"  # prompt tokens still to decode; samples once the last one is decoded
    GENERATING = "generating"  # its last sampled token is decoded in the next step
    DONE = "done"  # ended, failed or dropped; holds no slot


class Slot:
    """One KV sequence of the context: the tokens whose cells it holds, and the choice using it."""

    __slots__ = ("id", "tokens", "seq")

    def __init__(self, seq_id: int):
        self.id = seq_id
        self.tokens: list[int] = []
        self.seq: Seq | None = None


class Seq:
    """One choice of one request, from the queue to its end."""

    __slots__ = ("stream", "index", "prompt", "params", "budget", "state", "slot", "pending", "next_token",
                 "picker", "count", "cached", "admitted")

    def __init__(self, stream: TokenStream, index: int, prompt: list[int], params: GenParams, budget: int):
        self.stream = stream
        self.index = index
        self.prompt = prompt
        self.params = params
        self.budget = budget
        self.state = State.QUEUED
        self.slot: Slot | None = None
        self.pending: list[int] = []  # PREFILLING: prompt tokens still to decode
        self.next_token: int | None = None  # GENERATING: sampled, decoded in the next step
        self.picker: Picker | None = None
        self.count = 0
        self.cached = 0
        self.admitted = 0.0


class Part(NamedTuple):
    """One choice's share of a batch: tokens that follow its slot's, and the batch row whose logits it
    samples after the decode (-1: a prompt chunk with more to come)."""

    seq: Seq
    tokens: list[int]
    from_prompt: bool
    row: int


class Scheduler:
    def __init__(self, ll: Any, ctx: Any, mem: Any, vocabulary: Vocabulary, sampling: Sampling, cache: PromptCache,
                 *, slots: int, n_ctx: int, n_batch: int, name: str, threads: int = 1):
        self._ll, self._ctx, self._mem = ll, ctx, mem
        self._threads = self._running_threads = threads
        self._vocabulary = vocabulary
        self._sampling = sampling
        self._cache = cache
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.name = name
        self._batch = ll.llama_batch_init(n_batch, 0, 1)
        self.slots = [Slot(i) for i in range(slots)]
        self.queue: deque[Seq] = deque()
        self.active: list[Seq] = []  # admitted, in admission order
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "cached_tokens": 0}
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated) per step
        self._step_s = 0.0  # moving averages: a step of generated tokens only; one prompt token's share
        self._prompt_token_s = 0.0

    def start(self, prompt: Sequence[int], params: Sequence[GenParams], stream: TokenStream) -> None:
        """Queue one choice per ``params`` entry; the loop admits them first come, first served."""
        for index, choice in enumerate(params):
            budget = token_budget(self.n_ctx, len(prompt), choice)
            if budget <= 0:
                stream.push(index, SeqEnd("length"))
                continue
            self.queue.append(Seq(stream, index, list(prompt), choice, budget))

    def busy(self) -> bool:
        return bool(self.active or self.queue)

    def load_report(self) -> dict[str, float]:
        """Slots, queue and token counters for /metrics (read from the event loop: plain values only)."""
        now = time.monotonic()
        recent = [r for r in list(self._recent) if now - r[0] <= RATE_WINDOW]
        return {"slots": len(self.slots), "busy": sum(1 for s in self.slots if s.seq is not None),
                "queued": len(self.queue), "prompt_cache_bytes": self._cache.size, **self.stats,
                "prompt_tokens_per_second": sum(r[1] for r in recent) / RATE_WINDOW,
                "generated_tokens_per_second": sum(r[2] for r in recent) / RATE_WINDOW}

    def step(self) -> None:
        self._drop_unwanted()
        self._admit()
        if not self.active:
            return
        while True:
            plan = self.plan()
            if not plan:  # nothing can move: never spin on it
                self.fail(RuntimeError("no choice in flight had a token to decode"))
                return
            started = time.perf_counter()
            code = self.execute(plan)
            if code != 1:
                break
            # no room: free what departed clients hold, else turn the newest request away; then plan again
            if not (self._drop_unwanted() or self._shed_newest()) or not self.active:
                break
        if code == 1 and not self.active:
            return
        if code != 0:
            raise RuntimeError(f"llama_decode failed with status {code}")
        prompt_tokens = sum(len(part.tokens) for part in plan if part.from_prompt)
        self._measure(time.perf_counter() - started, prompt_tokens, len(plan) - sum(p.from_prompt for p in plan))
        generated = self.stats["generated_tokens"]
        self._sample([part for part in plan if part.row >= 0])
        self.stats["prompt_tokens"] += prompt_tokens
        now = time.monotonic()
        self._recent.append((now, prompt_tokens, self.stats["generated_tokens"] - generated))
        while now - self._recent[0][0] > RATE_WINDOW:
            self._recent.popleft()

    def _measure(self, seconds: float, prompt_tokens: int, generating: int) -> None:
        """Learn what a step of generated tokens costs, and what a prompt token adds to one."""
        if not prompt_tokens:
            if generating:
                self._step_s = seconds if not self._step_s else 0.8 * self._step_s + 0.2 * seconds
            return
        share = max(0.0, seconds - (self._step_s if generating else 0.0)) / prompt_tokens
        self._prompt_token_s = share if not self._prompt_token_s else 0.8 * self._prompt_token_s + 0.2 * share

    def _chunk_beside_streams(self) -> int:
        """Prompt tokens for a step that also carries generating choices (see ``PREFILL_STALL``)."""
        if not (self._step_s and self._prompt_token_s):
            return PREFILL_CHUNK_MAX
        fits = int(PREFILL_STALL * self._step_s / self._prompt_token_s)
        return max(PREFILL_CHUNK_MIN, min(PREFILL_CHUNK_MAX, fits))

    def plan(self) -> list[Part]:
        """The next batch, without changing anything: one token per generating choice, then prompt chunks
        in admission order, ``n_batch`` tokens at most; beside generating choices, only as many prompt
        tokens as keep the step short (``_chunk_beside_streams``), since every stream waits for it."""
        parts: list[Part] = []
        n = 0
        for seq in self.active:
            if seq.state is State.GENERATING:
                parts.append(Part(seq, [seq.next_token], False, n))
                n += 1
        limit = min(self.n_batch, n + self._chunk_beside_streams()) if n else self.n_batch
        for seq in self.active:
            if n >= limit:
                break
            if seq.state is State.PREFILLING and seq.pending:
                take = seq.pending[: limit - n]
                last = len(take) == len(seq.pending)
                parts.append(Part(seq, take, True, n + len(take) - 1 if last else -1))
                n += len(take)
        return parts

    def execute(self, plan: list[Part]) -> int:
        """Write ``plan`` into the batch and decode it: llama_decode's status (1: no room in the cache).
        Only a decode that succeeded moves the slots and the prompts on; a failed one leaves them as
        they were (llama.cpp also restores its cache), so the step can plan again."""
        batch = self._batch
        n = 0
        for part in plan:
            slot = part.seq.slot
            for pos, token in enumerate(part.tokens, len(slot.tokens)):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.id
                batch.logits[n] = n == part.row
                n += 1
        batch.n_tokens = n
        with cpu_budget.piece(self._threads, least=1) as threads:
            if threads != self._running_threads:  # as many as the CPU budget lends this step
                self._ll.llama_set_n_threads(self._ctx, threads, threads)
                self._running_threads = threads
            code = self._ll.llama_decode(self._ctx, batch)
        if code == 0:
            for seq, tokens, from_prompt, _ in plan:
                seq.slot.tokens.extend(tokens)
                if from_prompt:
                    del seq.pending[: len(tokens)]
        return code

    def fail(self, exc: BaseException) -> None:
        """A step failed: every request in flight gets the error and the cache starts over."""
        for seq in self.active + list(self.queue):
            seq.stream.fail(exc)
            self._release(seq, keep_cache=False)
        self.queue.clear()
        self.active.clear()
        self._ll.llama_memory_clear(self._mem, True)
        for slot in self.slots:
            slot.tokens = []
        self._cache.clear()

    def close(self) -> None:
        for seq in self.active + list(self.queue):
            seq.stream.fail(BackendError(f"model {self.name!r} was unloaded"))
            if seq.picker is not None:
                self._sampling.free(seq.picker)
        self.active.clear()
        self.queue.clear()
        self._ll.llama_batch_free(self._batch)

    # -- admission ----------------------------------------------------------------------------------------

    def _drop_unwanted(self) -> bool:
        """Release the choices nobody waits for any more; whether there were any in flight."""
        gone = [s for s in self.active if not s.stream.wanted(s.index)]
        for seq in gone:
            self._release(seq, keep_cache=not seq.stream.cancelled)  # a stop string's end keeps the cache
        if any(not s.stream.wanted(s.index) for s in self.queue):
            self.queue = deque(s for s in self.queue if s.stream.wanted(s.index))
        return bool(gone)

    def _admit(self) -> None:
        while self.queue:
            seq = self.queue[0]
            free = [s for s in self.slots if s.seq is None]
            if not free:
                return
            if any(o.stream is seq.stream and o.state is State.PREFILLING for o in self.active):
                return  # wait one more step and share the prompt's cells instead of computing them twice
            self.queue.popleft()
            try:
                self._place(seq, free[0])
            except Exception as exc:  # this request alone fails (e.g. a sampler llama.cpp refuses)
                seq.stream.fail(exc)
                self._release(seq, keep_cache=False)

    def _place(self, seq: Seq, slot: Slot) -> None:
        """Start ``seq`` in a free slot from the longest prefix of its prompt that is already computed."""
        seq.picker = self._sampling.picker(seq.params)
        prompt, scope = seq.prompt, seq.params.cache_scope
        limit = len(prompt) - 1  # at least one prompt token is decoded, for the logits to sample from
        donor = max((s for s in self.slots if s.seq is not None and s.seq.params.cache_scope == scope),
                    default=None, key=lambda s: common_prefix(s.tokens, prompt))
        shared = min(common_prefix(donor.tokens, prompt), limit) if donor is not None else 0
        saved, restored = self._cache.best(prompt, scope)
        restored = min(restored, limit)
        keep = 0
        if max(shared, restored) >= MIN_CACHED_TOKENS:
            if shared >= restored:
                self._ll.llama_memory_seq_cp(self._mem, donor.id, slot.id, 0, shared)
                keep = shared
            elif self._cache.restore(saved, slot.id, restored):
                keep = restored
            # else no room for the copy now: the prompt is computed instead
        slot.tokens = prompt[:keep]
        seq.slot, slot.seq = slot, seq
        seq.pending = prompt[keep:]
        seq.state = State.PREFILLING
        seq.cached = keep
        seq.admitted = time.monotonic()
        self.stats["cached_tokens"] += keep
        self.active.append(seq)

    # -- after a decode -----------------------------------------------------------------------------------

    def _sample(self, parts: list[Part]) -> None:
        sampling, vocabulary = self._sampling, self._vocabulary
        for part in parts:
            seq, picker = part.seq, part.seq.picker
            try:
                token = sampling.pick(picker, part.row)
            except ConstraintError as exc:
                self._refuse(seq, exc)
                continue
            if token is None or (vocabulary.is_eog(token) and not seq.params.ignore_eos):
                self._end(seq, "stop")  # an end-of-generation token, or a grammar that is complete
                continue
            seq.count += 1
            self.stats["generated_tokens"] += 1
            piece = picker.shown.get(token) or vocabulary.token_bytes(token)
            seq.stream.push(seq.index, sampling.step_for(picker, token, piece, part.row))
            if picker.awaiting is not None:
                try:
                    sampling.watch_trigger(picker, piece)
                except ConstraintError as exc:
                    self._refuse(seq, exc)
                    continue
            if seq.count >= seq.budget:
                self._end(seq, "length")
            else:
                seq.next_token = token
                seq.state = State.GENERATING

    def _end(self, seq: Seq, reason: str) -> None:
        self._release(seq, keep_cache=True)  # first: once the client hears of the end, the slot is free
        seq.stream.push(seq.index, SeqEnd(reason, seq.cached))

    def _refuse(self, seq: Seq, exc: ConstraintError) -> None:
        """End a request whose constraint cannot go on: its client gets the reason, its slot is freed."""
        seq.stream.fail(exc)
        self._release(seq, keep_cache=False)

    def _shed_newest(self) -> bool:
        if len(self.active) <= 1:
            return False
        seq = max(self.active, key=lambda s: s.admitted)
        seq.stream.fail(EngineBusy(f"Model '{self.name}' has no room left in its context cache "
                                   f"({self.n_ctx} tokens shared by {len(self.active)} requests); retry later",
                                   retry_after=1))
        self._release(seq, keep_cache=False)
        return True

    def _release(self, seq: Seq, *, keep_cache: bool) -> None:
        if seq in self.active:
            self.active.remove(seq)
        seq.state = State.DONE
        slot, seq.slot = seq.slot, None
        if slot is not None:
            slot.seq = None
            if keep_cache:
                self._cache.save(slot.id, slot.tokens, seq.params.cache_scope)
            self._ll.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
            slot.tokens = []
        if seq.picker is not None:
            self._sampling.free(seq.picker)
