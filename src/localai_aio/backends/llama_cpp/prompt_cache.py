"""Finished requests' cells, kept in host memory for the next request that starts the same way.

When a request finishes, its slot's cells are copied to host memory (llama.cpp's sequence state, bounded
by ``prompt_cache_mb``) and freed, as llama.cpp's server does with its RAM cache; the cache therefore never
crowds the context, and attention never spans idle requests' cells (it covers every used cell up to the
highest one, so idle caches left in place slowed every stream by a tenth). A conversation's next turn
restores its longest saved prefix and computes only the new messages. Copies are kept per ``cache_scope``
(an API key's, see ``principal``): a prompt computed for another key is never reused, so neither
``cached_tokens`` nor the time to first token tells one user what another one asked.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Host memory kept for finished requests' caches, in MB, unless a model's YAML sets ``prompt_cache_mb``.
PROMPT_CACHE_MB = 256
#: Shorter caches are not worth a copy: computing them again is as quick.
MIN_CACHED_TOKENS = 4


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Saved:
    """A finished request's cells, copied to host memory with the tokens they hold and whose they are."""

    __slots__ = ("tokens", "state", "last_used", "scope")

    def __init__(self, tokens: list[int], state: np.ndarray, last_used: float, scope: str):
        self.tokens = tokens
        self.state = state
        self.last_used = last_used
        self.scope = scope


class PromptCache:
    """The saved copies of one context, at most ``limit`` bytes (least recently used copies go first)."""

    def __init__(self, ll: Any, ctx: Any, mem: Any, limit: int):
        self._ll = ll
        self._ctx = ctx
        self._mem = mem
        self.limit = limit
        self.saved: list[_Saved] = []
        self.size = 0  # bytes held

    def save(self, seq_id: int, tokens: list[int], scope: str) -> None:
        """Copy the cells of sequence ``seq_id``, which hold ``tokens``, to host memory."""
        ll = self._ll
        if len(tokens) < MIN_CACHED_TOKENS or not self.limit:
            return
        size = ll.llama_state_seq_get_size(self._ctx, seq_id)
        if size > self.limit:
            return
        # numpy's memory, not a ctypes array: ctypes zero-fills its arrays while holding the GIL, which for a
        # long conversation's cells (~100 MB for 4k tokens) stalled every thread for ~150 ms; here the pages
        # are first touched by llama.cpp's copy, which runs without the GIL.
        state = np.empty(size, dtype=np.uint8)
        if ll.llama_state_seq_get_data(self._ctx, _pointer(state), size, seq_id) != size:
            return
        # A copy whose tokens this one extends holds nothing more.
        for old in [e for e in self.saved if e.scope == scope and common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self._forget(old)
        self.saved.append(_Saved(list(tokens), state, time.monotonic(), scope))
        self.size += size
        while self.size > self.limit:
            self._forget(min(self.saved, key=lambda e: e.last_used))

    def best(self, prompt: Sequence[int], scope: str) -> tuple[_Saved | None, int]:
        """The copy in ``scope`` sharing the longest prefix with ``prompt``, and that prefix's length."""
        saved = max((e for e in self.saved if e.scope == scope), default=None,
                    key=lambda e: common_prefix(e.tokens, prompt))
        return saved, common_prefix(saved.tokens, prompt) if saved is not None else 0

    def restore(self, saved: _Saved, seq_id: int, keep: int) -> bool:
        """Load the first ``keep`` tokens' cells of ``saved`` into sequence ``seq_id``; False (and the
        sequence left empty) when the context has no room for the copy now."""
        ll = self._ll
        if not ll.llama_state_seq_set_data(self._ctx, _pointer(saved.state), len(saved.state), seq_id):
            ll.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            return False
        ll.llama_memory_seq_rm(self._mem, seq_id, keep, -1)
        saved.last_used = time.monotonic()
        return True

    def clear(self) -> None:
        self.saved.clear()
        self.size = 0

    def _forget(self, saved: _Saved) -> None:
        self.saved.remove(saved)
        self.size -= len(saved.state)


def _pointer(state: np.ndarray) -> Any:
    return state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
