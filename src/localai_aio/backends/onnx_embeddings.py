"""Backend ``onnx-embeddings``: an optimum-exported encoder folder on ONNX Runtime.

Needs only onnxruntime, ``tokenizers`` and numpy at run time. The folder holds ``model.onnx``,
``tokenizer.json`` and ``config.json``, and for sentence-transformers models ``1_Pooling/config.json``
and ``modules.json`` (which say how to pool and whether to normalize). The YAML may override them with
``pooling: mean | cls`` and ``normalize: true | false``. Texts longer than the model takes are truncated
at its maximum length. A batch is sorted by length and split so each ONNX run pads only to its own
longest text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from localai_aio.backends.base import BackendError, read_json, require_file
from localai_aio.backends.onnx_common import make_session

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig, ServerSettings

log = logging.getLogger(__name__)
RUN_BATCH = 16  # texts per ONNX run inside one merged batch


class OnnxEmbeddingEngine:
    def __init__(self, cfg: ModelConfig, settings: ServerSettings):
        from tokenizers import Tokenizer

        folder = require_file(cfg)
        if not folder.is_dir() or not (folder / "model.onnx").is_file() or not (folder / "tokenizer.json").is_file():
            raise BackendError("an onnx-embeddings model is a folder with model.onnx and tokenizer.json")
        self.name = cfg.name
        config = read_json(folder / "config.json")
        st_config = read_json(folder / "sentence_bert_config.json")
        tok_config = read_json(folder / "tokenizer_config.json")
        limits = [v for v in (st_config.get("max_seq_length"), config.get("max_position_embeddings"),
                              tok_config.get("model_max_length")) if isinstance(v, int) and 0 < v < 1_000_000]
        self.max_length = int(cfg.option("max_length") or (min(limits) if limits else 512))
        self.pooling = str(cfg.option("pooling") or self._pooling_from(folder)).lower()
        if self.pooling not in ("mean", "cls"):
            raise BackendError(f"unknown pooling {self.pooling!r} (mean or cls)")
        normalize = cfg.option("normalize")
        self.normalize = bool(normalize) if normalize is not None else self._normalize_from(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.session = make_session(folder / "model.onnx", cfg, settings)
        self.inputs = {i.name for i in self.session.get_inputs()}
        if "input_ids" not in self.inputs:
            raise BackendError("model.onnx has no input_ids input")
        self.output = self.session.get_outputs()[0].name
        self.dimensions = int(self.session.get_outputs()[0].shape[-1])
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or self.tokenizer.token_to_id("<pad>") or 0
        self.vocab_size = self.tokenizer.get_vocab_size()

    @staticmethod
    def _pooling_from(folder: Path) -> str:
        pooling = read_json(folder / "1_Pooling" / "config.json")
        if pooling.get("pooling_mode_cls_token"):
            return "cls"
        return "mean"

    @staticmethod
    def _normalize_from(folder: Path) -> bool:
        modules = read_json(folder / "modules.json") if (folder / "modules.json").is_file() else []
        return any("Normalize" in str(m.get("type", "")) for m in modules) if isinstance(modules, list) else False

    def embedding_tokens(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as the model sees them (special tokens added, truncated at its maximum length)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def embed(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Embeddings (float32, one row per input, in input order) for already tokenized inputs."""
        out = np.zeros((len(token_lists), self.dimensions), dtype=np.float32)
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        for start in range(0, len(order), RUN_BATCH):
            chunk = order[start:start + RUN_BATCH]
            out[chunk] = self._run([list(token_lists[i])[: self.max_length] for i in chunk])
        return out

    def _run(self, batch: list[list[int]]) -> np.ndarray:
        width = max(len(ids) for ids in batch)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = mask
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run([self.output], feed)[0]
        if hidden.ndim == 2:  # the graph pools itself (a sentence_embedding output)
            pooled = hidden
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        pooled = pooled.astype(np.float32)
        if self.normalize:
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return pooled

    def close(self) -> None:
        self.session = None


def load(cfg: ModelConfig, settings: ServerSettings) -> OnnxEmbeddingEngine:
    return OnnxEmbeddingEngine(cfg, settings)
