"""Tiny real models written by the tests themselves (no downloads).

``write_tiny_gguf`` writes a 2-layer llama GGUF with a SentencePiece vocabulary (byte fallback) and a
ChatML template. Its weights make greedy output predictable: the transformer blocks add nothing to
the residual stream, so the logits depend only on the current token, and the output matrix maps each
token to a chosen successor (``SUCCESSORS``). After the ChatML prompt ends with "\\n" the model says
" Hello world! Hello world! ..." until ``max_tokens``; after " bye" it ends with the end token.
Both llama-cpp-python and ctransformers load it.

The models exported with torch and optimum (``export_tiny_*``) take seconds to minutes each, so they are
built once into a cache (``$LOCALAI_TEST_CACHE``, else ``~/.cache/localai-aio/tiny-models``) under a key that
hashes this file, the project's exporter, the options and the tool chain's versions, and copied from there;
any change to what makes them builds them again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = ["▁Hello", "▁world", "!", "▁bye", "▁by", "▁the", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "▁a", "▁b"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def vocabulary(bpe: bool = False, extra: dict[str, int] | None = None) -> tuple[list[str], list[int], list[float]]:
    """SentencePiece (or BPE) pieces; ``extra`` appends tokens of the given GGUF token types (3: control,
    4: user-defined), such as a tool format's markers."""
    tokens, types, scores = [], [], []
    for i, tok in enumerate(SPECIALS):
        tokens.append(tok)
        types.append(2 if i == 0 else 3)
        scores.append(0.0)
    if not bpe:
        for b in range(256):
            tokens.append(f"<0x{b:02X}>")
            types.append(6)
            scores.append(0.0)
    for i, word in enumerate(WORDS + ["▁"] + LETTERS):
        tokens.append(word if not bpe else word.replace("▁", "Ġ"))
        types.append(1)
        scores.append(-float(i) if len(word) > 1 else -100.0 - i)
    for text, kind in (extra or {}).items():
        tokens.append(text)
        types.append(kind)
        scores.append(0.0)
    return tokens, types, scores


def successors(tokens: list[str], then: dict[str, str] | None = None) -> dict[int, int]:
    """Each token's greedy successor; ``then`` overrides some (e.g. "!" -> a tool call's opener)."""
    index = {t: i for i, t in enumerate(tokens)}
    space = "Ġ" if "ĠHello" in index else "▁"
    newline = index.get("<0x0A>", index.get("Ċ"))
    chain = {f"{space}Hello": f"{space}world", f"{space}world": "!", "!": f"{space}Hello",
             f"{space}bye": "</s>", "<|im_end|>": "</s>"}
    succ = {i: (i + 1) % len(tokens) for i in range(len(tokens))}
    for src, dst in chain.items():
        succ[index[src]] = index[dst]
    if newline is not None:
        succ[newline] = index[f"{space}Hello"]
    # Never produce <unk>/<s> by accident: the default successor of the last token is " Hello".
    succ[len(tokens) - 1] = index[f"{space}Hello"]
    for src, dst in (then or {}).items():
        succ[index[src]] = index[dst]
    return succ


def write_tiny_gguf(path: str | Path, *, bpe: bool = False, chat_template: str | None = CHATML,
                    dim: int = 64, layers: int = 2, context: int = 256, seed: int = 0,
                    logit_scale: float = 4.0, extra_tokens: dict[str, int] | None = None,
                    then: dict[str, str] | None = None) -> Path:
    import gguf

    path = Path(path)
    tokens, types, scores = vocabulary(bpe, extra_tokens)
    n_vocab = len(tokens)
    heads = 4
    ff = 128
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n_vocab, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out = np.zeros((n_vocab, dim), dtype=np.float32)
    for src, dst in successors(tokens, then).items():
        out[dst] += emb[src]
    out *= logit_scale  # 4.0 keeps greedy margins wide; a small scale makes sampling really random

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(dim // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    if bpe:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_merges(["Ġ H", "e l"])
    else:
        w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    if chat_template:
        w.add_chat_template(chat_template)

    w.add_tensor("token_embd.weight", emb)
    w.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    w.add_tensor("output.weight", out)
    zeros = np.zeros
    for b in range(layers):
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(dim, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v"):
            w.add_tensor(f"blk.{b}.{name}.weight", rng.standard_normal((dim, dim)).astype(np.float32) * 0.02)
        w.add_tensor(f"blk.{b}.attn_output.weight", zeros((dim, dim), dtype=np.float32))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(dim, dtype=np.float32))
        w.add_tensor(f"blk.{b}.ffn_gate.weight", rng.standard_normal((ff, dim)).astype(np.float32) * 0.02)
        w.add_tensor(f"blk.{b}.ffn_up.weight", rng.standard_normal((ff, dim)).astype(np.float32) * 0.02)
        w.add_tensor(f"blk.{b}.ffn_down.weight", zeros((dim, ff), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- the cache of exported models --------------------------------------------------------------------------

#: The distributions whose versions can change what an export writes.
TOOL_CHAIN = ("torch", "transformers", "optimum", "optimum-onnx", "diffusers", "onnx", "onnxruntime",
              "onnxruntime-gpu", "tokenizers", "numpy")


def cache_root() -> Path:
    return Path(os.environ.get("LOCALAI_TEST_CACHE") or Path.home() / ".cache" / "localai-aio" / "tiny-models")


def cache_key(name: str, options: dict[str, object]) -> str:
    """What the model is made from: this file, the project's exporter, the options and the versions."""
    import localai_aio.gallery.export as exporter

    digest = hashlib.sha256()
    sources = [Path(__file__)] + sorted(Path(exporter.__file__).parent.glob("*.py"))
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    versions = []
    for dist in TOOL_CHAIN:
        try:
            versions.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}: none")
    digest.update(repr((name, sorted(options.items()), sys.version_info[:2], versions)).encode())
    return digest.hexdigest()[:24]


def cached(name: str, build: Callable[..., object], folder: str | Path, **options: object) -> Path:
    """``build(folder, **options)`` through the cache: built once into a temporary folder beside the entry and
    renamed into place (so concurrent test runs never see half an entry; the loser of a race drops its
    copy), then copied into ``folder``."""
    folder = Path(folder)
    entry = cache_root() / f"{name}-{cache_key(name, options)}"
    if not entry.is_dir():
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            build(staging / "model", **options)
            try:
                os.rename(staging / "model", entry)
            except OSError:
                if not entry.is_dir():  # not another run's finished entry: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(entry, folder, dirs_exist_ok=True)
    return folder


# -- ONNX embedding models ---------------------------------------------------------------------------------

EMBED_WORDS = ["the", "cat", "kitten", "car", "dog", "hello", "world", "a", "small", "big"]
EMBED_VOCAB = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + EMBED_WORDS
                                 + [chr(c) for c in range(97, 123)]))


def write_wordpiece_tokenizer(folder: Path, max_length: int = 16) -> None:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {tok: i for i, tok in enumerate(EMBED_VOCAB)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").write_text("\n".join(EMBED_VOCAB))


def write_standin_embedder(folder: str | Path, *, dim: int = 8, max_length: int = 16, normalize: bool = True,
                           seed: int = 0) -> tuple[Path, np.ndarray]:
    """A stand-in encoder (onnx.helper): token embedding lookup masked by the attention mask.

    Returns the folder and the embedding table, so tests can compute the exact expected vectors.
    """
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = np.random.default_rng(seed).standard_normal((len(EMBED_VOCAB), dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
        helper.make_node("Unsqueeze", ["attention_mask", "axis"], ["mask3"]),
        helper.make_node("Cast", ["mask3"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["embedded", "maskf"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes, "standin",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", dim])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([-1], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(folder / "model.onnx"))
    write_wordpiece_tokenizer(folder, max_length)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": max_length}))
    if normalize:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return folder, table


def export_tiny_bert(folder: str | Path) -> Path:
    """A random 2-layer BERT saved with transformers (``folder/source``) and exported to ONNX by optimum
    (``folder/onnx``; needs the export extra), from the cache."""
    return cached("bert", _export_tiny_bert, folder)


def _export_tiny_bert(folder: Path) -> Path:
    from optimum.exporters.onnx import main_export
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    source = folder / "source"
    source.mkdir(parents=True)
    import torch

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(EMBED_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(source)
    (source / "vocab.txt").write_text("\n".join(EMBED_VOCAB))
    BertTokenizerFast(str(source / "vocab.txt"), model_max_length=64).save_pretrained(source)
    with warnings.catch_warnings():  # the exporters' own deprecation chatter
        warnings.simplefilter("ignore")
        main_export(str(source), output=str(folder / "onnx"), task="feature-extraction", device="cpu")
    return folder


# -- a stand-in Piper voice --------------------------------------------------------------------------------

STANDIN_SAMPLES_PER_PHONEME = 256


def write_standin_piper(path: str | Path, *, speakers: tuple[str, ...] = (), rate: int = 22050,
                        durations: bool = False) -> Path:
    """A graph with Piper's inputs and outputs (onnx.helper): a tone whose length is
    ``phoneme ids x 256 x length_scale`` samples and whose pitch depends on the speaker. ``durations``:
    it also computes each phoneme id's length in frames of 256 samples with a ``Ceil`` node, as VITS
    voices do internally (``w_ceil``), for the server to expose."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    const = {"per": np.array([float(STANDIN_SAMPLES_PER_PHONEME)], np.float32), "one": np.array(1, np.int64),
             "zero_f": np.array(0.0, np.float32), "step": np.array(1.0, np.float32),
             "freq": np.array(0.05, np.float32), "shape": np.array([1, 1, 1, -1], np.int64),
             "amp": np.array(0.5, np.float32), "pitch_step": np.array(0.02, np.float32)}
    nodes = [
        helper.make_node("Cast", ["input_lengths"], ["len_f"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["scales", "one"], ["length_scale"]),
        helper.make_node("Mul", ["len_f", "per"], ["samples_f"]),
        helper.make_node("Mul", ["samples_f", "length_scale"], ["limit_v"]),
        helper.make_node("ReduceSum", ["limit_v"], ["limit"], keepdims=0),
        helper.make_node("Range", ["zero_f", "limit", "step"], ["t"]),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.INT64, [1, "phonemes"]),
              helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
              helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3])]
    if speakers:
        inputs.append(helper.make_tensor_value_info("sid", TensorProto.INT64, [1]))
        nodes += [helper.make_node("Cast", ["sid"], ["sid_f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["sid_f", "pitch_step"], ["extra"]),
                  helper.make_node("Add", ["extra", "freq"], ["pitch"])]
    else:
        nodes.append(helper.make_node("Identity", ["freq"], ["pitch"]))
    if durations:
        nodes += [helper.make_node("Cast", ["input"], ["ids_f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["ids_f", "zero_f"], ["zeros"]),
                  helper.make_node("Add", ["zeros", "length_scale"], ["w"]),
                  helper.make_node("Ceil", ["w"], ["w_ceil_flat"]),
                  helper.make_node("Unsqueeze", ["w_ceil_flat", "axis1"], ["w_ceil"])]
        const["axis1"] = np.array([1], np.int64)
    nodes += [helper.make_node("Mul", ["t", "pitch"], ["phase"]),
              helper.make_node("Sin", ["phase"], ["wave"]),
              helper.make_node("Mul", ["wave", "amp"], ["audio"]),
              helper.make_node("Reshape", ["audio", "shape"], ["output"])]
    graph = helper.make_graph(nodes, "piper-standin", inputs,
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 1, "samples"])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in const.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    symbols = ["_", "^", "$", " "] + [chr(c) for c in range(33, 127)] + [chr(c) for c in range(0xA0, 0x370)]
    config = {"audio": {"sample_rate": rate}, "espeak": {"voice": "en-us"},
              "inference": {"noise_scale": 0.667, "length_scale": 1, "noise_w": 0.8}, "phoneme_type": "espeak",
              "phoneme_id_map": {s: [i] for i, s in enumerate(dict.fromkeys(symbols))}, "num_symbols": len(symbols),
              "num_speakers": max(1, len(speakers)), "speaker_id_map": {s: i for i, s in enumerate(speakers)}}
    path.with_name(path.name + ".json").write_text(json.dumps(config))
    return path


# -- a tiny Stable Diffusion pipeline ----------------------------------------------------------------------

def write_clip_tokenizer(folder: Path) -> None:
    """A CLIP-format BPE tokenizer: the 256 byte characters, the same with </w>, a few merges."""
    import json

    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def export_tiny_stable_diffusion(folder: str | Path) -> Path:
    """A random Stable Diffusion pipeline built from small configs and exported by optimum (text-to-image),
    from the cache: the ONNX pipeline folder."""
    return cached("stable-diffusion", _export_tiny_stable_diffusion, folder) / "onnx"


def _export_tiny_stable_diffusion(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from optimum.exporters.onnx import main_export
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    source = folder / "source"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=1000, bos_token_id=0, eos_token_id=2,
                                                pad_token_id=1, max_position_embeddings=77, projection_dim=32))
    write_clip_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"),
                              model_max_length=77)
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(source), output=str(folder / "onnx"), task="text-to-image", device="cpu")
    return folder / "onnx"


# -- a tiny Whisper ----------------------------------------------------------------------------------------

def whisper_tokenizer(languages: int = 99):  # noqa: ANN201
    """A byte-level tokenizer with Whisper's special tokens at Whisper's ids (multilingual layout)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for word in ("Ġhello", "Ġworld", "Ġthe", "Ġdog"):
        vocab[word] = len(vocab)
    while len(vocab) < 50257:
        vocab[f"Ġw{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{c}|>" for c in list(LANGUAGES)[:languages]]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                   "<|notimestamps|>"])
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False) for i in range(1501)])
    return tok


def save_tiny_whisper(folder: Path) -> Path:
    """A random 1-layer Whisper (d_model 32) with the tokenizer above, saved as a transformers folder."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    folder.mkdir(parents=True, exist_ok=True)
    eot = "<|endoftext|>"
    WhisperTokenizerFast(tokenizer_object=whisper_tokenizer(), bos_token=eot, eos_token=eot, unk_token=eot,
                         pad_token=eot).save_pretrained(folder)
    config = WhisperConfig(vocab_size=51865, d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
                           decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257, max_length=448,
        no_timestamps_token_id=50363, is_multilingual=True,
        lang_to_id={f"<|{c}|>": 50259 + i for i, c in enumerate(list(LANGUAGES)[:99])},
        task_to_id={"translate": 50358, "transcribe": 50359}, suppress_tokens=[1, 2, 7],
        begin_suppress_tokens=[220, 50257])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def export_tiny_whisper(folder: str | Path) -> Path:
    """The tiny Whisper exported by the project's own exporter (encoder, decoder, decoder with past), from the
    cache: the ONNX folder."""
    return cached("whisper", _export_tiny_whisper, folder) / "onnx"


def _export_tiny_whisper(folder: Path) -> Path:
    from localai_aio.gallery.export import export_whisper

    source = save_tiny_whisper(folder / "source")
    return export_whisper(source, folder / "onnx")


def export_tiny_whisper_alignment(folder: str | Path, heads: list[list[int]] | None = None) -> tuple[Path, Path]:
    """The tiny Whisper saved with ``heads`` as its ``alignment_heads`` (none: the exporter's fallback, every
    head of the last half of the layers), and only its word-alignment graph exported, from the cache. Returns
    (transformers folder, graph)."""
    from localai_aio.backends.onnx_whisper import ALIGNMENT_FILE

    folder = cached("whisper-alignment", _export_tiny_whisper_alignment, folder, heads=heads)
    return folder / "source", folder / "onnx" / ALIGNMENT_FILE


def _export_tiny_whisper_alignment(folder: Path, heads: list[list[int]] | None) -> tuple[Path, Path]:
    import json

    from localai_aio.gallery.whisper_alignment import export_alignment

    source = save_tiny_whisper(folder / "source")
    if heads is not None:
        path = source / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "alignment_heads": heads}))
    return source, export_alignment(source, folder / "onnx")


# -- tiny cross-encoders (rerankers) -----------------------------------------------------------------------

def save_tiny_cross_encoder(folder: str | Path, *, num_labels: int = 1, scale: float = 1000.0, seed: int = 5) -> Path:
    """A random 2-layer BertForSequenceClassification over ``EMBED_VOCAB`` with its fast tokenizer (which pairs
    texts as ``[CLS] a [SEP] b [SEP]``), saved as a transformers folder. Random heads give logits near 0;
    ``scale`` multiplies the classifier's weights so scores spread out, and with seed 5 the test sentences'
    scores lie well apart (with many seeds a random head scores every pair nearly alike)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(EMBED_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(EMBED_VOCAB))
    BertTokenizerFast(str(folder / "vocab.txt"), model_max_length=64).save_pretrained(folder)
    return folder


def export_tiny_cross_encoder(folder: str | Path, *, num_labels: int = 1, scale: float = 1000.0) -> tuple[Path, Path]:
    """The tiny cross-encoder exported by the project's own exporter (text-classification), from the cache.
    Returns (transformers folder, ONNX folder)."""
    folder = cached("cross-encoder", _export_tiny_cross_encoder, folder, num_labels=num_labels, scale=scale)
    return folder / "source", folder / "onnx"


def _export_tiny_cross_encoder(folder: Path, *, num_labels: int, scale: float) -> tuple[Path, Path]:
    from localai_aio.gallery.export import export_text_classification

    source = save_tiny_cross_encoder(folder / "source", num_labels=num_labels, scale=scale)
    return source, export_text_classification(source, folder / "onnx")


#: transformers' BERT weights -> llama.cpp's tensor names for LLM_ARCH_BERT. The pooler (dense + tanh on
#: [CLS]) is llama.cpp's ``cls`` and the classifier its ``cls.output``: rank pooling computes
#: cls.output(tanh(cls([CLS]))), which is exactly BertForSequenceClassification's logits.
BERT_GGUF_NAMES = {
    "bert.embeddings.word_embeddings.weight": "token_embd.weight",
    "bert.embeddings.token_type_embeddings.weight": "token_types.weight",
    "bert.embeddings.position_embeddings.weight": "position_embd.weight",
    "bert.embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "bert.embeddings.LayerNorm.bias": "token_embd_norm.bias",
    "bert.pooler.dense.weight": "cls.weight", "bert.pooler.dense.bias": "cls.bias",
    "classifier.weight": "cls.output.weight", "classifier.bias": "cls.output.bias",
}
BERT_GGUF_LAYER = {
    "attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output", "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up", "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm",
}


def write_tiny_rerank_gguf(source: str | Path, path: str | Path, *, head: bool = True, pooling: bool = True,
                           rerank_template: str | None = None) -> Path:
    """The tiny cross-encoder saved by ``save_tiny_cross_encoder`` as a BERT GGUF (float32) with a WordPiece
    vocabulary, as llama.cpp's converter writes one: ``bert.pooling_type`` rank (unless ``pooling`` is off),
    [CLS] as BOS and [SEP] as EOS and SEP, add_bos and add_eos on and add_sep off, so a pair is
    ``[CLS] q [SEP] d [SEP]`` (BERT's own pair layout). ``head`` off drops the classification head;
    ``rerank_template`` is written as the file's ``rerank`` chat template."""
    import gguf
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(source).eval()
    config = model.config
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = dict(BERT_GGUF_NAMES)
    for b in range(config.num_hidden_layers):
        for hf, ours in BERT_GGUF_LAYER.items():
            for kind in ("weight", "bias"):
                names[f"bert.encoder.layer.{b}.{hf}.{kind}"] = f"blk.{b}.{ours}.{kind}"
    index = {tok: i for i, tok in enumerate(EMBED_VOCAB)}
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name("tiny-test-cross-encoder")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_layer_norm_eps(config.layer_norm_eps)
    w.add_causal_attention(False)
    w.add_token_type_count(config.type_vocab_size)
    w.add_file_type(0)
    if pooling:
        w.add_pooling_type(gguf.PoolingType.RANK)
    w.add_tokenizer_model("bert")
    # WordPiece in GGUF: word-initial pieces carry the phantom space, specials stay as they are
    w.add_token_list([tok if tok.startswith("[") else "\u2581" + tok for tok in EMBED_VOCAB])
    w.add_token_types([3 if tok.startswith("[") else 1 for tok in EMBED_VOCAB])
    w.add_bos_token_id(index["[CLS]"])
    w.add_eos_token_id(index["[SEP]"])
    w.add_sep_token_id(index["[SEP]"])
    w.add_unk_token_id(index["[UNK]"])
    w.add_pad_token_id(index["[PAD]"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    w.add_add_sep_token(False)
    if rerank_template is not None:
        w.add_chat_template([{"name": "rerank", "template": rerank_template}])
    for hf, ours in names.items():
        if head or not ours.startswith("cls"):
            w.add_tensor(ours, weights[hf])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def write_standin_reranker(folder: str | Path, *, dim: int = 8, max_length: int = 16,
                           seed: int = 0) -> tuple[Path, dict]:
    """A stand-in cross-encoder (onnx.helper), no torch needed: logit = (the sum over the pair's unmasked
    tokens of ``table[id] + types[segment]``) . ``weight``, as [batch, 1] ``logits``, with a WordPiece tokenizer
    that pairs texts as ``[CLS] a [SEP] b [SEP]`` (segments 0 then 1). Returns the folder and the weights
    (``table``, ``types``, ``weight``), so tests can compute the exact scores."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weights = {"table": rng.standard_normal((len(EMBED_VOCAB), dim)).astype(np.float32),
               "types": rng.standard_normal((2, dim)).astype(np.float32),
               "weight": (rng.standard_normal((dim, 1)) / dim).astype(np.float32)}
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["segments"]),
        helper.make_node("Add", ["tokens", "segments"], ["embedded"]),
        helper.make_node("Unsqueeze", ["attention_mask", "axis"], ["mask3"]),
        helper.make_node("Cast", ["mask3"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["embedded", "maskf"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "seq_axis"], ["summed"], keepdims=0),
        helper.make_node("MatMul", ["summed", "weight"], ["logits"]),
    ]
    ids = ["input_ids", "attention_mask", "token_type_ids"]
    graph = helper.make_graph(
        nodes, "standin-reranker", [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ids],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()]
        + [numpy_helper.from_array(np.array([-1], np.int64), "axis"),
           numpy_helper.from_array(np.array([1], np.int64), "seq_axis")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
              str(folder / "model.onnx"))
    vocab = {tok: i for i, tok in enumerate(EMBED_VOCAB)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": max_length,
                                                    "pad_token_id": 0, "num_labels": 1}))
    return folder, weights
