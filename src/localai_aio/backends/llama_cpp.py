"""Backend ``llama-cpp``: GGUF models on llama-cpp-python (the default for ``.gguf`` files)."""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from localai_aio.backends.base import BackendError, context_size_for, require_file, scrub, threads_for
from localai_aio.backends.gguf_info import GGUFInfo, read_gguf_info
from localai_aio.generation import GenParams, TokenStep

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig, ServerSettings

log = logging.getLogger(__name__)

# llama.cpp prints grammar parse errors straight to the process's stderr; capturing them means
# redirecting file descriptor 2 for the moment of the parse, one thread at a time.
_STDERR_LOCK = threading.Lock()


class LlamaCppEngine:
    supports_grammar = True
    supports_logprobs = True

    def __init__(self, cfg: ModelConfig, settings: ServerSettings):
        import llama_cpp

        path = require_file(cfg)
        self.info: GGUFInfo = read_gguf_info(path)
        self.name = cfg.name
        n_ctx = context_size_for(cfg, settings)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=threads_for(cfg, settings),
                n_threads_batch=threads_for(cfg, settings), seed=cfg.seed if cfg.seed is not None else -1,
                embedding=cfg.embeddings, verbose=False,
                **({"pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN} if cfg.embeddings else {}),
                use_mmap=bool(cfg.option("mmap", True)),
            )
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"llama.cpp could not load the file: {scrub(exc, path)}") from None
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self._eog = {t for t in (self.llm.token_eos(), self.info.eos_id) if t is not None and t >= 0}
        self._vocab = self.llm._model.vocab
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            import ctypes

            import llama_cpp

            buf = ctypes.create_string_buffer(256)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[: max(n, 0)]
        return piece

    def is_eog(self, token: int) -> bool:
        if token in self._eog:
            return True
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def generate(self, prompt: Sequence[int], params: GenParams) -> Iterator[TokenStep]:
        from llama_cpp import LlamaGrammar, LogitsProcessorList

        seed = params.seed if params.seed is not None else random.randrange(2**31)
        self.llm.set_seed(seed)
        grammar = None
        if params.grammar is not None:
            grammar = LlamaGrammar.from_string(params.grammar, verbose=False)
        captured: list[np.ndarray] = []
        processors = None
        if params.logprobs is not None:
            def capture(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
                captured.append(np.array(scores, dtype=np.float32))
                return scores

            processors = LogitsProcessorList([capture])
        greedy = params.temperature <= 0
        steps = self.llm.generate(
            list(prompt), top_k=1 if greedy else params.top_k, top_p=params.top_p, min_p=params.min_p,
            temp=0.0 if greedy else params.temperature, repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
            logits_processor=processors, grammar=grammar,
        )
        for token in steps:
            if captured:
                yield _with_logprobs(token, captured.pop(), params.logprobs or 0)
            else:
                yield TokenStep(token)

    # -- embeddings (models with `embeddings: true`) -----------------------------------------------------------

    @property
    def dimensions(self) -> int:
        return self.llm.n_embd()

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    @property
    def max_length(self) -> int:
        return self.n_ctx

    def embedding_tokens(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t, add_bos=True, special=False)[: self.n_ctx] for t in texts]

    def embed(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Mean-pooled, normalized embeddings, one llama.cpp run per input."""
        if not self.llm.context_params.embeddings:
            raise BackendError(f"model {self.name!r} is not configured for embeddings (set `embeddings: true`)")
        texts = [self.llm.detokenize(list(tokens)).decode("utf-8", "replace") for tokens in token_lists]
        vectors = np.asarray(self.llm.embed(texts, normalize=False, truncate=True), dtype=np.float32)
        vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        return vectors

    def check_grammar(self, grammar: str) -> str | None:
        """None when llama.cpp accepts the GBNF grammar, else the parser's message."""
        import llama_cpp

        with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
            saved = os.dup(2)
            os.dup2(sink.fileno(), 2)
            try:
                sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            printed = sink.read().decode("utf-8", "replace")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
            return None
        lines = [line.strip() for line in printed.splitlines() if "error" in line.lower()]
        return lines[0] if lines else "llama.cpp could not parse the grammar"

    def close(self) -> None:
        self.llm.close()


def _with_logprobs(token: int, logits: np.ndarray, top_n: int) -> TokenStep:
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top: tuple[tuple[int, float], ...] = ()
    if top_n:
        best = np.argpartition(-logprobs, min(top_n, len(logprobs) - 1))[:top_n]
        best = best[np.argsort(-logprobs[best])]
        top = tuple((int(t), float(logprobs[t])) for t in best)
    return TokenStep(token, float(logprobs[token]), top)


def load(cfg: ModelConfig, settings: ServerSettings) -> LlamaCppEngine:
    return LlamaCppEngine(cfg, settings)
