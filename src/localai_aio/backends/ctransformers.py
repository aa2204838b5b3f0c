"""Backend ``ctransformers``: the older GGUF engine, for the files it can really load.

ctransformers bundles a llama.cpp from 2023-09. A GGUF with a BPE ("gpt2") vocabulary crashes it
with a segfault ("byte not found in vocab"), and newer architectures are unknown to it, so the header
is read first and such files are refused with the reason. It does not parse special tokens such as
``<|im_start|>`` in text, so prompts are split on the model's control tokens and passed as ids.
It has no grammar support and reports no log-probabilities, and it cannot batch: an instance serves
one request at a time on its own thread (``parallel`` loads that many instances).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from localai_aio.backends.base import BackendError, context_size_for, require_file, scrub, threads_for
from localai_aio.backends.gguf_info import GGUFInfo, read_gguf_info
from localai_aio.backends.text import GenParams, TokenStream, generate_sequentially

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig, ServerSettings

#: Architectures whose GGUF files ctransformers' llama.cpp (2023-09) loads, with a SentencePiece vocabulary.
SUPPORTED_ARCHITECTURES = {"llama"}
SUPPORTED_TOKENIZERS = {"llama"}


def check_loadable(info: GGUFInfo) -> None:
    hint = "; use `backend: llama-cpp` for this model"
    if info.tokenizer_model not in SUPPORTED_TOKENIZERS:
        raise BackendError(f"ctransformers cannot load a GGUF with a '{info.tokenizer_model or 'unknown'}' "
                           f"vocabulary (only SentencePiece 'llama' vocabularies){hint}")
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise BackendError(f"ctransformers does not know the '{info.architecture}' architecture{hint}")


class CTransformersEngine:
    supports_grammar = False
    supports_logprobs = False
    sampling = frozenset({"repeat_last_n"})

    def __init__(self, cfg: ModelConfig, settings: ServerSettings):
        path = require_file(cfg)
        self.info = read_gguf_info(path)
        check_loadable(self.info)
        from ctransformers import AutoModelForCausalLM

        self.threads = threads_for(cfg, settings)
        self.n_ctx = context_size_for(cfg, settings)
        try:
            self.llm = AutoModelForCausalLM.from_pretrained(
                str(path), model_type="llama", lib=cfg.option("lib") or "avx2",
                context_length=self.n_ctx, threads=self.threads)
        except (OSError, RuntimeError, ValueError) as exc:
            raise BackendError(f"ctransformers could not load the file: {scrub(exc, path)}") from None
        self._eos = self.llm.eos_token_id
        self.n_vocab = len(self.info.tokens)
        self._pieces: dict[int, bytes] = {}
        specials = sorted(self.info.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        ids: list[int] = [self.info.bos_id] if add_bos and self.info.bos_id is not None else []
        parts = self._special_re.split(text) if special and self._special_re else [text]
        for part in parts:
            if not part:
                continue
            if special and part in self.info.special_tokens:
                ids.append(self.info.special_tokens[part])
            else:
                ids.extend(self.llm.tokenize(part, add_bos_token=False))
        return ids

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.llm.detokenize([token], decode=False)
        return piece

    def is_eog(self, token: int) -> bool:
        return token == self._eos

    def start(self, prompt: Sequence[int], params: Sequence[GenParams], stream: TokenStream) -> None:
        generate_sequentially(self, prompt, params, stream)

    def generate(self, prompt: Sequence[int], params: GenParams) -> Iterator[int]:
        greedy = params.temperature <= 0
        yield from self.llm.generate(
            list(prompt), top_k=1 if greedy else params.top_k, top_p=params.top_p,
            temperature=max(params.temperature, 1e-6) if not greedy else 1.0,
            repetition_penalty=params.repeat_penalty, last_n_tokens=params.repeat_last_n if params.repeat_last_n >= 0
            else self.n_ctx, seed=params.seed if params.seed is not None else -1,
            threads=self.threads, reset=True,
        )

    def close(self) -> None:
        llm, self.llm = self.llm, None
        del llm


def load(cfg: ModelConfig, settings: ServerSettings) -> CTransformersEngine:
    return CTransformersEngine(cfg, settings)
