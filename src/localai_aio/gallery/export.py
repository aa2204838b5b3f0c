"""Model tooling: export a local transformers / sentence-transformers folder to ONNX with optimum.

Needs the export tool chain (``pip install 'localai-aio[export]'``: CPU torch, transformers < 4.58,
optimum, optimum-onnx); serving the exported folder needs only onnxruntime and tokenizers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from localai_aio.gallery.onnx_tools import ExportError, quiet_tool_chain

#: sentence-transformers files that say how to pool and normalize; copied next to the ONNX model.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                               "1_Pooling/config.json")


def _optimum_export(source: Path | str, out: Path, task: str, **options: str) -> None:
    try:
        with quiet_tool_chain("optimum.exporters.onnx:main_export"):
            from optimum.exporters.onnx import main_export

            try:
                main_export(str(source), output=str(out), task=task, device="cpu", **options)
            except Exception as exc:  # optimum raises many kinds; the message is what matters
                raise ExportError(f"optimum could not export {source}: {exc}") from None
    except ImportError:
        raise ExportError("exporting needs the export tool chain: pip install 'localai-aio[export]'") from None


def export_feature_extraction(source: Path | str, out: Path) -> Path:
    """``source`` (a transformers folder, optionally sentence-transformers) -> ``out/model.onnx`` + tokenizer."""
    _optimum_export(source, out, "feature-extraction", library_name="transformers")
    for name in SENTENCE_TRANSFORMERS_FILES if isinstance(source, Path) else ():
        if (source / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, out / name)
    if not (out / "model.onnx").is_file():
        raise ExportError(f"optimum wrote no model.onnx for {source}")
    return out


def export_text_classification(source: Path | str, out: Path) -> Path:
    """A cross-encoder (a ``...ForSequenceClassification`` folder: bge-reranker, ms-marco cross-encoders) ->
    ``out/model.onnx`` giving ``logits`` [batch, labels] + tokenizer, for the ``onnx-rerank`` backend. The
    library is named: a folder sentence-transformers can also read would otherwise be exported as an embedder."""
    _optimum_export(source, out, "text-classification", library_name="transformers")
    for name in ("model.onnx", "tokenizer.json"):
        if not (out / name).is_file():
            raise ExportError(f"optimum wrote no {name} for {source}")
    return out


def export_whisper(source: Path | str, out: Path) -> Path:
    """A transformers Whisper folder -> encoder, decoder, decoder-with-past and alignment ONNX models + tokenizer."""
    _optimum_export(source, out, "automatic-speech-recognition-with-past")
    merged = out / "decoder_model_merged.onnx"
    if merged.is_file():
        merged.unlink()  # the separate decoders are what the server runs
    for name in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"):
        if not (out / name).is_file():
            raise ExportError(f"optimum wrote no {name} for {source}")
    from localai_aio.gallery.whisper_alignment import export_alignment  # word timestamps' cross-attention graph

    export_alignment(source, out)
    return out


def export_text_to_image(source: Path | str, out: Path) -> Path:
    """A diffusers Stable Diffusion folder (or Hub id) -> optimum's ONNX pipeline folder."""
    _optimum_export(source, out, "text-to-image")
    if not (out / "model_index.json").is_file():
        raise ExportError(f"optimum wrote no model_index.json for {source}")
    return out
