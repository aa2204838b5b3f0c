"""Model tooling: export a local transformers / sentence-transformers folder to ONNX with optimum.

Needs the export tool chain (``pip install 'localai-aio[export]'``: CPU torch, transformers < 4.58,
optimum, optimum-onnx); serving the exported folder needs only onnxruntime and tokenizers.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

#: sentence-transformers files that say how to pool and normalize; copied next to the ONNX model.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                               "1_Pooling/config.json")


class ExportError(Exception):
    pass


#: ``models install --verbose``: let the export tool chain's own warnings and logs through.
SHOW_TOOL_CHAIN = False

#: The tool chain's loggers. optimum reports float32 rounding beyond its tolerance as errors ("values not close
#: enough") although the export succeeded, diffusers names optimum's two distributions when it is imported,
#: torch and transformers comment on tracing: nothing a user installing a model can act on.
TOOL_CHAIN_LOGGERS = ("optimum", "transformers", "diffusers", "diffusers.utils.import_utils", "torch", "onnx",
                      "onnxruntime", "onnxscript", "accelerate", "huggingface_hub")
_QUIET = logging.CRITICAL + 1


class _ThisThread(logging.Filter):
    """Drops the records logged on one thread (the exporting one), so other threads' records still pass."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


def _load(modules: tuple[str, ...]) -> None:
    for spec in modules:
        module, _, name = spec.partition(":")
        loaded = importlib.import_module(module)
        if name:
            getattr(loaded, name)


@contextlib.contextmanager
def quiet_tool_chain(*modules: str) -> Iterator[None]:
    """Import ``modules`` (``module:name`` also loads a name: optimum's modules load lazily) and run the block
    without the export tool chain's warnings and logs (unless ``SHOW_TOOL_CHAIN``): Python warnings are
    ignored, the chain's loggers are raised above CRITICAL and what this thread logs on the root logger itself
    (onnxruntime's quantizer advises "pre-processing" there) is dropped; all of it is restored on leaving. The
    chain's libraries set their loggers' levels when first imported, which is why the imports happen in here.
    The levels are the process's: while a model installs, the chain's other users (image generation) are quiet
    too. An install reports its own progress and outcome."""
    if SHOW_TOOL_CHAIN:
        _load(modules)
        yield
        return
    loggers = [logging.getLogger(name) for name in TOOL_CHAIN_LOGGERS]
    before = {logger: logger.level for logger in loggers}
    root, this_thread = logging.getLogger(), _ThisThread()
    # logging.warning() on a root logger without handlers would first install one on stderr for good
    guard = None if root.handlers else logging.NullHandler()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(_QUIET)
        root.addFilter(this_thread)
        if guard:
            root.addHandler(guard)
        configured: dict[logging.Logger, int] = {}
        try:
            _load(modules)
            configured = {logger: logger.level for logger in loggers}  # a first import sets its library's level
            for logger in loggers:
                logger.setLevel(_QUIET)
            yield
        finally:
            for logger in loggers:
                level = configured.get(logger, _QUIET)
                logger.setLevel(before[logger] if level == _QUIET else level)
            root.removeFilter(this_thread)
            if guard:
                root.removeHandler(guard)


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


def quantize_int8(folder: Path, names: tuple[str, ...], *, ops: tuple[str, ...] = (), per_channel: bool = False,
                  suffix: str = "") -> None:
    """Dynamic int8 quantization of the named ONNX models (weights int8, activations float).

    On CPUs this roughly halves Whisper's decoding time at the same transcripts, as CTranslate2's int8 does.
    ``ops``: only these operator types (by default ONNX Runtime's choice, convolutions included);
    ``per_channel``: one scale per output channel; ``suffix``: the int8 model goes next to the float32 one
    as ``<stem><suffix>.onnx`` (``encoder_model.int8.onnx``) and the float32 one stays, else it is replaced.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ExportError("quantizing needs onnxruntime and onnx: pip install 'localai-aio[export]'") from None
    for name in names:
        source = folder / name
        if not source.is_file():
            raise ExportError(f"nothing to quantize: {name} is missing")
        staged = folder / f".{name}.int8"
        with quiet_tool_chain():
            quantize_dynamic(str(source), str(staged), weight_type=QuantType.QInt8, per_channel=per_channel,
                             op_types_to_quantize=list(ops) or None)
        staged.replace(source.with_name(source.stem + suffix + source.suffix) if suffix else source)


def export_text_to_image(source: Path | str, out: Path) -> Path:
    """A diffusers Stable Diffusion folder (or Hub id) -> optimum's ONNX pipeline folder."""
    _optimum_export(source, out, "text-to-image")
    if not (out / "model_index.json").is_file():
        raise ExportError(f"optimum wrote no model_index.json for {source}")
    return out
