"""What every exporter shares: its error type and int8 quantization of the ONNX models it wrote. A module
of its own so that the exporters (``export``, ``whisper_alignment``) import it, and not each other."""

from __future__ import annotations

import warnings
from pathlib import Path


class ExportError(Exception):
    pass


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source), str(staged), weight_type=QuantType.QInt8, per_channel=per_channel,
                             op_types_to_quantize=list(ops) or None)
        staged.replace(source.with_name(source.stem + suffix + source.suffix) if suffix else source)
