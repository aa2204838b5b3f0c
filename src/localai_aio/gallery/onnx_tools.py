"""What every exporter shares: its error type, a quiet export tool chain and int8 quantization of the ONNX
models it wrote. A module of its own so that the exporters (``export``, ``whisper_alignment``) import it, and
not each other."""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path


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
