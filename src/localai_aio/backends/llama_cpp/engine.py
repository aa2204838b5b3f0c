"""``LlamaCppEngine``: one GGUF model, its context and the parts that serve it.

The engine loads the weights once and makes one context with ``parallel`` slots in a unified cache of
``context_size`` cells, then composes the parts: the vocabulary (read-only, any thread), the scheduler
(continuous batching on the engine's thread), each choice's sampling, the prompt cache and, for
embedding and reranking models, pooling.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from localai_aio.backends.base import (
    BackendError,
    Unsupported,
    context_size_for,
    require_file,
    slots_for,
    threads_for,
)
from localai_aio.backends.constraint import Grammars
from localai_aio.backends.gguf_info import GGUFInfo, read_gguf_info
from localai_aio.backends.llama_cpp.pooling import Pooling, rank_pooling
from localai_aio.backends.llama_cpp.prompt_cache import PROMPT_CACHE_MB, PromptCache
from localai_aio.backends.llama_cpp.sampling import Sampling
from localai_aio.backends.llama_cpp.scheduler import Scheduler
from localai_aio.backends.llama_cpp.vocabulary import Vocabulary, _install_log_callback
from localai_aio.backends.text import EXTRA_SAMPLING, GenParams, TokenStream

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig, ServerSettings

log = logging.getLogger(__name__)

#: Tokens decoded per step at most (running streams plus prompt chunks).
BATCH_TOKENS = 512


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
        try:  # a reranker: llama.cpp's rank pooling (see rerank)
            self.ranks = rank_pooling(llama_cpp, self._model, self.info.architecture, cfg, path)
        except BackendError:
            llama_cpp.llama_model_free(self._model)
            raise
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
        mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = n_ctx
        self.n_batch = int(cparams.n_batch)
        self.vocabulary = Vocabulary(llama_cpp, self._model, self.info.eos_id)
        self.n_vocab = self.vocabulary.n_vocab
        self.grammars: Grammars = self.vocabulary.grammars
        self.cache_limit = int(float(cfg.option("prompt_cache_mb", PROMPT_CACHE_MB)) * 1024 * 1024)
        self.prompt_cache = PromptCache(llama_cpp, self._ctx, mem, self.cache_limit)
        self.scheduler = Scheduler(llama_cpp, self._ctx, mem, self.vocabulary,
                                   Sampling(llama_cpp, self._ctx, self.vocabulary, n_ctx, self.name),
                                   self.prompt_cache, slots=self.slots_total, n_ctx=n_ctx, n_batch=self.n_batch,
                                   name=self.name, threads=threads)
        self.stats = self.scheduler.stats
        self.pooling = Pooling(llama_cpp, self._ctx, mem, self.vocabulary, self.n_batch, seq_id=self.slots_total,
                               threads=threads)
        if not pooled:
            # Built here, during the load, rather than by the first request with a grammar: making it holds
            # the GIL for ~300 ms (50k tokens), which would stall every stream of the process once. A
            # vocabulary llguidance cannot take (BERT's word pieces) still loads: its first grammar says why.
            self.vocabulary.longest_piece  # noqa: B018 - a scan of the vocabulary, done once, now
            try:
                self.grammars.tokenizer()
            except Exception as exc:  # noqa: BLE001
                log.info("%s: no grammar tokenizer at load (%s)", self.name, exc)
        log.info("%s: %d slot(s) sharing %d context cells, %d thread(s)", self.name, self.slots_total, n_ctx,
                 threads)

    # -- vocabulary (any thread) --------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self.vocabulary.tokenize(text, add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        return self.vocabulary.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        return self.vocabulary.is_eog(token)

    @property
    def longest_piece(self) -> int:
        return self.vocabulary.longest_piece

    def check_grammar(self, grammar: str) -> str | None:
        return self.vocabulary.check_grammar(grammar)

    # -- requests (the engine's thread) -------------------------------------------------------------------

    def start(self, prompt: Sequence[int], params: Sequence[GenParams], stream: TokenStream) -> None:
        self.scheduler.start(prompt, params, stream)

    def busy(self) -> bool:
        return self.scheduler.busy()

    def step(self) -> None:
        self.scheduler.step()

    def fail(self, exc: BaseException) -> None:
        self.scheduler.fail(exc)

    def load_report(self) -> dict[str, float]:
        return self.scheduler.load_report()

    # -- embeddings (models with `embeddings: true`) ------------------------------------------------------

    @property
    def dimensions(self) -> int:
        return self.pooling.dimensions

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    @property
    def max_length(self) -> int:
        return self.n_ctx

    def embedding_tokens(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t, add_bos=True, special=False)[: self.n_ctx] for t in texts]

    def embed(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        if not self.embeddings:
            raise BackendError(f"model {self.name!r} is not configured for embeddings (set `embeddings: true`)")
        return self.pooling.embed(token_lists)

    # -- reranking (cross-encoders: llama.cpp's rank pooling) ---------------------------------------------

    @property
    def rank_limit(self) -> int:
        return self.pooling.rank_limit

    def rank_tokens(self, query: str, document: str) -> list[int]:
        return self.pooling.rank_tokens(query, document)

    def rerank(self, query: str, documents: Sequence[str]) -> list[tuple[float, int]]:
        if not self.ranks:
            raise Unsupported(f"Model '{self.name}' does not rerank: it has no rank pooling (a "
                              "cross-encoder GGUF needs `pooling: rank` in its config)", param="model")
        return self.pooling.rerank(query, documents)

    def close(self) -> None:
        self.scheduler.close()
        self.pooling.close()
        self._ll.llama_free(self._ctx)
        self._ll.llama_model_free(self._model)
