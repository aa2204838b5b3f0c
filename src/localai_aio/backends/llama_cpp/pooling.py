"""Pooled outputs: embeddings (``embeddings: true``) and rerank scores (cross-encoders' rank pooling).

Each input is decoded alone, in one micro-batch, in a sequence kept for pooled outputs beside the
generation slots, and its cells are freed right after.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from localai_aio import cpu_budget
from localai_aio.backends.base import BackendError, PromptTooLong
from localai_aio.backends.llama_cpp.vocabulary import Vocabulary

if TYPE_CHECKING:
    from pathlib import Path

    from localai_aio.config import ModelConfig


def rank_pooling(ll: Any, model: Any, architecture: str, cfg: ModelConfig, path: Path) -> bool:
    """Whether this model scores (query, document) pairs with llama.cpp's rank pooling: its YAML says
    ``pooling: rank``, or says no ``pooling`` and the GGUF's ``<arch>.pooling_type`` is rank (4), as
    llama.cpp's converter writes it for sequence-classification models. The file must hold a
    classification head (``cls`` or ``cls.output``): without one, llama.cpp's rank graph quietly returns
    the first token's hidden state, which is no score."""
    wanted = cfg.option("pooling")
    if wanted is None:
        found = _meta(ll, model, f"{architecture}.pooling_type")
        wanted = "rank" if found == str(ll.LLAMA_POOLING_TYPE_RANK) else None
    if str(wanted).lower() != "rank":
        return False
    if not _has_rank_head(path):
        raise BackendError("rank pooling needs a classification head (cls.weight or cls.output.weight), "
                           "which this GGUF does not have")
    return True


def _meta(ll: Any, model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(64)
    n = ll.llama_model_meta_val_str(model, key.encode("utf-8"), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


def _has_rank_head(path: Path) -> bool:
    """Whether a GGUF holds a classification head, from its tensor names (llama.cpp has no call that says)."""
    from gguf import GGUFReader

    return any(t.name in ("cls.weight", "cls.output.weight") for t in GGUFReader(str(path)).tensors)


class Pooling:
    """Embeddings and rerank scores of one context, decoded in sequence ``seq_id``."""

    def __init__(self, ll: Any, ctx: Any, mem: Any, vocabulary: Vocabulary, n_batch: int, seq_id: int,
                 threads: int = 1):
        self._ll = ll
        self._threads = threads
        self._ctx = ctx
        self._mem = mem
        self._model = vocabulary.model
        self._vocabulary = vocabulary
        self._n_batch = n_batch
        self._seq_id = seq_id
        self._batch: Any = None  # allocated on first use

    @property
    def dimensions(self) -> int:
        return int(self._ll.llama_model_n_embd(self._model))

    def embed(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Mean-pooled, normalized embeddings, one input at a time."""
        out = np.zeros((len(token_lists), self.dimensions), dtype=np.float32)
        self._ll.llama_set_embeddings(self._ctx, True)
        try:
            for row, tokens in enumerate(token_lists):
                out[row] = self._pooled(list(tokens)[: self._n_batch], self.dimensions, "embed")
        finally:
            self._ll.llama_set_embeddings(self._ctx, False)
        out /= np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
        return out

    @property
    def rank_limit(self) -> int:
        """Most tokens one pair may take: one micro-batch, and no more positions than the model was trained
        with (BERT-style models have a table of positions and nothing past it)."""
        trained = int(self._ll.llama_model_n_ctx_train(self._model))
        return min(self._n_batch, trained) if trained > 0 else self._n_batch

    def rank_tokens(self, query: str, document: str) -> list[int]:
        """One pair as llama.cpp's server builds it (``format_prompt_rerank``): the GGUF's ``rerank``
        template with ``{query}`` and ``{document}`` filled in, when it has one (Qwen3 rerankers); else
        [BOS]query[EOS][SEP]document[EOS], each special token where the vocabulary adds it (``add_bos``,
        ``add_eos``, ``add_sep``) and EOS falling back to SEP, as the server does. A pair longer than the
        model takes is cut longest side first, as cross-encoders' tokenizers truncate; a template's prompt
        cannot be cut without losing the part the score is read after, so it is refused."""
        ll, vocab, limit, tokenize = self._ll, self._vocabulary.vocab, self.rank_limit, self._vocabulary.tokenize
        template = ll.llama_model_chat_template(self._model, b"rerank")
        if template:
            fill = {"{query}": query, "{document}": document}  # one pass: a query's "{document}" stays text
            prompt = re.sub(r"\{query\}|\{document\}", lambda m: fill[m.group(0)], template.decode("utf-8", "replace"))
            tokens = tokenize(prompt, add_bos=False, special=True)
            if len(tokens) > limit:
                raise PromptTooLong(f"A document and the query take {len(tokens)} tokens; this model "
                                    f"takes {limit}", param="documents")
            return tokens
        eos = ll.llama_vocab_eos(vocab)
        eos = eos if eos >= 0 else ll.llama_vocab_sep(vocab)
        head = [ll.llama_vocab_bos(vocab)] if ll.llama_vocab_get_add_bos(vocab) else []
        middle = ([eos] if ll.llama_vocab_get_add_eos(vocab) else []) + \
            ([ll.llama_vocab_sep(vocab)] if ll.llama_vocab_get_add_sep(vocab) else [])
        tail = [eos] if ll.llama_vocab_get_add_eos(vocab) else []
        q, d = (tokenize(text, add_bos=False, special=False) for text in (query, document))
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
        if self._batch is not None:
            self._ll.llama_batch_free(self._batch)
            self._batch = None

    def _pooled(self, tokens: Sequence[int], width: int, what: str) -> np.ndarray:
        """One input decoded alone in the sequence kept for pooled outputs; its ``width`` pooled floats.
        The sequence's cells are freed whatever happens, so a failed input leaves nothing behind."""
        ll, seq_id = self._ll, self._seq_id
        if self._batch is None:
            self._batch = ll.llama_batch_init(self._n_batch, 0, 1)
        batch = self._batch
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0], batch.logits[i] = seq_id, True
        batch.n_tokens = len(tokens)
        try:
            with cpu_budget.piece(self._threads):
                code = ll.llama_decode(self._ctx, batch)
            pooled = ll.llama_get_embeddings_seq(self._ctx, seq_id) if code == 0 else None
            if not pooled:
                raise BackendError(f"llama.cpp could not {what} an input (status {code})")
            return np.ctypeslib.as_array(pooled, shape=(width,)).copy()
        finally:
            ll.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
