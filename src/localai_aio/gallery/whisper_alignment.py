"""Whisper's word-alignment graph: the decoder's cross-attention weights of its alignment heads, as ONNX.

optimum's decoders return logits and the KV cache, never attention weights, yet word timestamps come from
where the decoder looks in the audio while it reads the transcript (openai-whisper's ``find_alignment``).
So a separate graph, ``decoder_alignment.onnx``, is exported with ``torch.onnx`` from the same transformers
checkpoint: inputs ``input_ids`` (1, tokens) and ``encoder_hidden_states`` (1, frames, d_model), output
``cross_attentions`` (alignment heads, tokens, frames), softmaxed as the decoder computes them. Decoder
layers after the last alignment head are left out, and so is the language-model head: nothing reads them.

The alignment heads are the model's own (``alignment_heads`` in generation_config.json, which the
CTranslate2 converter copies from the CTranslate2 config); a model without them gets every head of the
last half of its decoder layers, as openai-whisper does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from localai_aio.backends.onnx_whisper import ALIGNMENT_FILE
from localai_aio.config import resolve_inside
from localai_aio.gallery.onnx_tools import ExportError, quantize_int8, quiet_tool_chain

#: What the graph's output is named; the backend reads it by position, tools by name.
OUTPUT = "cross_attentions"


def alignment_heads(generation: Mapping[str, Any], layers: int, heads: int) -> list[tuple[int, int]]:
    """(layer, head) pairs: the generation config's ``alignment_heads``, else every head of the last half
    of the decoder layers (openai-whisper's default for a model whose heads are not known)."""
    given = generation.get("alignment_heads") or []
    if not given:
        return [(layer, head) for layer in range(layers // 2, layers) for head in range(heads)]
    pairs = []
    for pair in given:
        try:
            layer, head = (int(v) for v in pair)
        except (TypeError, ValueError):
            raise ExportError(f"alignment_heads must be [layer, head] pairs, not {pair!r}") from None
        if not (0 <= layer < layers and 0 <= head < heads):
            raise ExportError(f"alignment head {[layer, head]} is outside the decoder "
                              f"({layers} layers of {heads} heads)")
        pairs.append((layer, head))
    return pairs


def _generation_config(model: Any, source: Path | str) -> dict[str, Any]:
    """The checkpoint's generation config as a dict (transformers may drop keys it does not know)."""
    path = Path(source) / "generation_config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return model.generation_config.to_dict() if model.generation_config is not None else {}


def _alignment_module(decoder: Any, heads: list[tuple[int, int]]) -> Any:
    """A module that runs the transformers decoder (eager attention, so weights are returned) and stacks
    the alignment heads' cross-attention weights of the one sequence it gets."""
    import torch

    class CrossAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder
            self.heads = heads

        def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            n = input_ids.shape[-1]
            # An explicit additive causal mask: transformers' own mask builder (vmap) cannot be traced.
            causal = torch.full((n, n), float("-inf"), dtype=encoder_hidden_states.dtype).triu(1)[None, None]
            out = self.decoder(input_ids=input_ids, attention_mask=causal, encoder_hidden_states=encoder_hidden_states,
                               output_attentions=True, use_cache=False, return_dict=True)
            return torch.stack([out.cross_attentions[layer][0, head] for layer, head in self.heads])

    return CrossAttention().eval()


def export_alignment(source: Path | str, out: Path) -> Path:
    """A transformers Whisper folder (or Hub id) -> ``out/decoder_alignment.onnx``, written under a temporary
    name and renamed, so the folder never holds half a graph."""
    try:
        import torch
        from transformers import WhisperForConditionalGeneration
    except ImportError:
        raise ExportError("exporting needs the export tool chain: pip install 'localai-aio[export]'") from None
    with quiet_tool_chain():  # torch's and transformers' tracing chatter
        try:
            model = WhisperForConditionalGeneration.from_pretrained(source, attn_implementation="eager").eval()
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot load {source} to export its alignment graph: {exc}") from None
        config = model.config
        heads = alignment_heads(_generation_config(model, source), config.decoder_layers,
                                config.decoder_attention_heads)
        decoder = model.model.decoder
        decoder.layers = torch.nn.ModuleList(list(decoder.layers)[: max(layer for layer, _ in heads) + 1])
        module = _alignment_module(decoder, heads)
        tokens = torch.zeros((1, 3), dtype=torch.long)  # any ids: tracing needs only the shapes
        encoded = torch.zeros(1, config.max_source_positions, config.d_model)
        out.mkdir(parents=True, exist_ok=True)
        staged = out / f".{ALIGNMENT_FILE}.partial"
        try:
            with torch.no_grad():
                torch.onnx.export(module, (tokens, encoded), str(staged), dynamo=False, opset_version=17,
                                  input_names=["input_ids", "encoder_hidden_states"], output_names=[OUTPUT],
                                  dynamic_axes={"input_ids": {1: "tokens"}, "encoder_hidden_states": {1: "frames"},
                                                OUTPUT: {1: "tokens", 2: "frames"}})
        except Exception as exc:  # the tracer raises many kinds; the message is what matters
            staged.unlink(missing_ok=True)
            raise ExportError(f"torch could not export the alignment graph of {source}: {exc}") from None
    os.replace(staged, out / ALIGNMENT_FILE)
    return out / ALIGNMENT_FILE


def missing_alignments(folder: Path, post: Sequence[Mapping[str, Any]]) -> list[tuple[Path, Path]]:
    """(transformers folder, ONNX folder) of each Whisper export step of an installed gallery model whose
    ONNX folder has no alignment graph: models installed before word timestamps existed."""
    steps = [step for step in post if step.get("export") == "whisper"]
    pairs = [(resolve_inside(folder, step["from"]), resolve_inside(folder, step["to"])) for step in steps]
    return [(source, target) for source, target in pairs if not (target / ALIGNMENT_FILE).is_file()]


def add_missing_alignments(folder: Path, post: Sequence[Mapping[str, Any]],
                           report: Callable[[str], None] = lambda _: None) -> bool:
    """Export the alignment graph into an installed model that lacks it, from the transformers folder the
    install kept, so nothing is downloaded again; a later ``quantize`` step of the entry that names the
    graph is applied to it too. False (nothing done) when a transformers folder is gone: then only a full
    reinstall can add it."""
    missing = missing_alignments(folder, post)
    if not missing or not all(source.is_dir() for source, _ in missing):
        return False
    for source, target in missing:
        report(f"export alignment graph (word timestamps) into {target.name}")
        export_alignment(source, target)
        for step in post:
            if step.get("quantize") == "int8" and ALIGNMENT_FILE in (step.get("models") or ()) \
                    and resolve_inside(folder, step["in"]) == target:
                quantize_int8(target, (ALIGNMENT_FILE,))
    return True
