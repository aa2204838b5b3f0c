"""Backend ``onnx-rerank``: a cross-encoder (sequence classification) exported to ONNX, on ONNX Runtime.

The folder is what optimum's ``text-classification`` export writes (``models export --task
text-classification``, or the gallery's ``export: text-classification``): ``model.onnx`` (``input_ids``,
``attention_mask`` and, for BERT, ``token_type_ids`` in; ``logits`` [batch, labels] out), ``tokenizer.json``
and ``config.json``. It needs only onnxruntime, ``tokenizers`` and numpy at run time.

Each (query, document) pair is tokenized as the model's own tokenizer pairs texts (its post-processor adds
the special tokens and the segment ids: ``[CLS] q [SEP] d [SEP]`` for BERT, ``<s> q </s></s> d </s>`` for
XLM-RoBERTa) and cut at the model's maximum length longest side first, as transformers' tokenizers do
with ``truncation=True``; YAML ``max_length`` overrides the length. The pairs of a request are sorted by
length and run ``RUN_BATCH`` at a time, each run padded only to its own longest pair, as embeddings are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from localai_aio.backends.base import BackendError, read_json, require_file
from localai_aio.backends.onnx_common import make_session

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig, ServerSettings

RUN_BATCH = 16  # pairs per ONNX run
#: Models whose position ids start after the padding id (RoBERTa's layout): that many fewer positions.
OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert"})


class OnnxRerankEngine:
    def __init__(self, cfg: ModelConfig, settings: ServerSettings):
        from tokenizers import Tokenizer

        folder = require_file(cfg)
        if not folder.is_dir() or not (folder / "model.onnx").is_file() or not (folder / "tokenizer.json").is_file():
            raise BackendError("an onnx-rerank model is a folder with model.onnx and tokenizer.json")
        self.name = cfg.name
        self.max_length = int(cfg.option("max_length") or self._max_length_from(folder))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        self.session = make_session(folder / "model.onnx", cfg, settings)
        self.inputs = {i.name for i in self.session.get_inputs()}
        if "input_ids" not in self.inputs:
            raise BackendError("model.onnx has no input_ids input")
        output = self.session.get_outputs()[0]
        self.output = output.name
        if len(output.shape) != 2:
            raise BackendError(f"model.onnx gives {output.name} of shape {output.shape}; a cross-encoder gives "
                               "[batch, labels] (export it with the text-classification task)")
        config = read_json(folder / "config.json")
        pad = config.get("pad_token_id")
        self.pad_id = pad if isinstance(pad, int) else (self.tokenizer.token_to_id("[PAD]")
                                                        or self.tokenizer.token_to_id("<pad>") or 0)

    @staticmethod
    def _max_length_from(folder: Path) -> int:
        """The tokenizer's ``model_max_length``, or the positions the model has, whichever is fewer."""
        config = read_json(folder / "config.json")
        tok_config = read_json(folder / "tokenizer_config.json")
        positions = config.get("max_position_embeddings")
        if isinstance(positions, int) and config.get("model_type") in OFFSET_POSITIONS:
            positions -= int(config.get("pad_token_id", 1)) + 1
        limits = [v for v in (positions, tok_config.get("model_max_length"))
                  if isinstance(v, int) and 0 < v < 1_000_000]
        return min(limits) if limits else 512

    def rerank(self, query: str, documents: Sequence[str]) -> list[tuple[float, int]]:
        """Each document's relevance to the query in [0, 1], in order, with the tokens its pair took.

        The score is sigmoid of the head's logit, what sentence-transformers' CrossEncoder gives for a
        one-label model and what Jina's and Cohere's APIs promise (a relevance in [0, 1]). For a model with
        two or more labels the last label's logit is taken, through the same sigmoid: binary relevance
        classifiers put "relevant" last (label 1), and a softmax over labels whose meanings the folder does
        not say would be a guess.
        """
        encodings = self.tokenizer.encode_batch([(query, document) for document in documents])
        logits = np.zeros(len(encodings), dtype=np.float64)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), RUN_BATCH):
            chunk = order[start:start + RUN_BATCH]
            logits[chunk] = self._run([encodings[i] for i in chunk])
        scores = 0.5 * (1.0 + np.tanh(logits / 2))  # sigmoid, without overflow for large logits
        return [(float(score), len(e.ids)) for score, e in zip(scores, encodings, strict=True)]

    def _run(self, batch: list[Any]) -> np.ndarray:
        width = max(len(e.ids) for e in batch)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        types = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, encoding in enumerate(batch):
            n = len(encoding.ids)
            ids[row, :n], types[row, :n], mask[row, :n] = encoding.ids, encoding.type_ids, 1
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = mask
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = types
        return self.session.run([self.output], feed)[0][:, -1].astype(np.float64)

    def close(self) -> None:
        self.session = None


def load(cfg: ModelConfig, settings: ServerSettings) -> OnnxRerankEngine:
    return OnnxRerankEngine(cfg, settings)
