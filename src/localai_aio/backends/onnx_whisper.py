"""Backend ``onnx-whisper``: an optimum-exported Whisper folder, decoded greedily in ONNX Runtime.

Files: ``encoder_model.onnx``, ``decoder_model.onnx`` (first step, returns the KV cache),
``decoder_with_past_model.onnx`` (one token at a time on the cache), ``tokenizer.json``,
``config.json`` and ``generation_config.json``. Features are computed in numpy.

Transcription follows Whisper's own procedure: the special-token prompt (language, task, timestamps),
language detection from the first window when no language is given, Whisper's timestamp rules, and
long audio in 30 s windows where each next window starts at the last complete timestamp, so no words
are lost or doubled at the edges. The audio is decoded and featurised window by window as the seek
moves forward, never as a whole clip. A window stops at the end token or after 224 tokens; a window
judged silent (no-speech probability) is skipped; a window whose text is repetitive (gzip compression
ratio) is decoded again at higher temperatures, as Whisper does, so decoding does not loop.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from localai_aio.backends.base import BackendError, read_json, require_file
from localai_aio.backends.onnx_common import make_session
from localai_aio.backends.whisper_features import FRAMES_PER_SECOND, HOP, N_FRAMES, N_SAMPLES, window_features

if TYPE_CHECKING:
    from localai_aio.audio import AudioSource
    from localai_aio.config import ModelConfig, ServerSettings
    from localai_aio.runtime import CancelFlag

log = logging.getLogger(__name__)

MAX_WINDOW_TOKENS = 224
TIME_PRECISION = 0.02
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
COMPRESSION_THRESHOLD = 2.4
SILENCE = 1e-4  # no sample louder than this: digital silence


@dataclass
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment] = field(default_factory=list)


@dataclass
class _Window:
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    text: str = ""

    @property
    def compression_ratio(self) -> float:
        raw = self.text.encode("utf-8")
        return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


class WhisperEngine:
    def __init__(self, cfg: ModelConfig, settings: ServerSettings):
        from tokenizers import Tokenizer

        folder = require_file(cfg)
        needed = ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "tokenizer.json"]
        missing = [name for name in needed if not (folder / name).is_file()]
        if not folder.is_dir() or missing:
            raise BackendError(f"an onnx-whisper model is an optimum-exported folder; missing: {', '.join(missing)}")
        self.name = cfg.name
        config = read_json(folder / "config.json")
        generation = read_json(folder / "generation_config.json")
        self.n_mels = int(config.get("num_mel_bins", 80))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.encoder = make_session(folder / "encoder_model.onnx", cfg, settings, spinning=True)
        self.decoder = make_session(folder / "decoder_model.onnx", cfg, settings, spinning=True)
        self.decoder_past = make_session(folder / "decoder_with_past_model.onnx", cfg, settings, spinning=True)
        self.past_inputs = [i.name for i in self.decoder_past.get_inputs() if i.name.startswith("past_key_values")]

        def token(text: str) -> int:
            found = self.tokenizer.token_to_id(text)
            if found is None:
                raise BackendError(f"the tokenizer has no {text} token; is this a Whisper tokenizer?")
            return found

        self.eot = int(generation.get("eos_token_id", token("<|endoftext|>")))
        self.sot = int(generation.get("decoder_start_token_id", token("<|startoftranscript|>")))
        self.transcribe_id = token("<|transcribe|>")
        self.translate_id = token("<|translate|>")
        self.no_timestamps = int(generation.get("no_timestamps_token_id", token("<|notimestamps|>")))
        self.timestamp_begin = self.no_timestamps + 1
        self.sot_prev = self.tokenizer.token_to_id("<|startofprev|>")
        self.no_speech = self.tokenizer.token_to_id("<|nospeech|>") or self.tokenizer.token_to_id("<|nocaptions|>")
        lang_to_id = generation.get("lang_to_id") or {
            tok: idx for tok, idx in self.tokenizer.get_vocab(with_added_tokens=True).items()
            if self.sot < idx < self.translate_id and tok.startswith("<|") and tok.endswith("|>")}
        self.languages = {tok[2:-2]: int(idx) for tok, idx in lang_to_id.items()}
        self.multilingual = bool(self.languages)
        self.suppress = np.array(sorted(set(generation.get("suppress_tokens") or []) |
                                        {self.sot, self.translate_id, self.transcribe_id, self.no_timestamps}
                                        | ({self.sot_prev} if self.sot_prev is not None else set())
                                        | ({self.no_speech} if self.no_speech is not None else set())), dtype=np.int64)
        self.begin_suppress = np.array(generation.get("begin_suppress_tokens") or [self.eot], dtype=np.int64)
        self.max_target = int(config.get("max_target_positions", 448))

    # -- decoding ------------------------------------------------------------------------------------------

    def _encode(self, features: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"input_features": features})[0]

    def detect_language(self, encoded: np.ndarray) -> str:
        if not self.multilingual:
            return "en"
        logits = self.decoder.run(["logits"], {"input_ids": np.array([[self.sot]], np.int64),
                                               "encoder_hidden_states": encoded})[0][0, -1]
        ids = np.array(list(self.languages.values()))
        best = ids[int(np.argmax(logits[ids]))]
        return next(code for code, idx in self.languages.items() if idx == best)

    def _prompt(self, language: str, task: str, timestamps: bool, previous: list[int]) -> list[int]:
        prompt: list[int] = []
        if previous and self.sot_prev is not None:
            prompt = [self.sot_prev] + previous[-(self.max_target // 2 - 1):]
        prompt.append(self.sot)
        if self.multilingual:
            prompt += [self.languages.get(language, self.languages.get("en", self.sot + 1)),
                       self.translate_id if task == "translate" else self.transcribe_id]
        if not timestamps:
            prompt.append(self.no_timestamps)
        return prompt

    def _apply_rules(self, logits: np.ndarray, generated: list[int], timestamps: bool, max_initial: int) -> None:
        logits[self.suppress] = -np.inf
        if not generated:
            logits[self.begin_suppress] = -np.inf
        if not timestamps:
            logits[self.timestamp_begin:] = -np.inf
            return
        tb = self.timestamp_begin
        last_ts = len(generated) >= 1 and generated[-1] >= tb
        penultimate_ts = len(generated) < 2 or generated[-2] >= tb
        if last_ts:
            if penultimate_ts:
                logits[tb:] = -np.inf  # a pair of timestamps is closed: text must follow
            else:
                logits[: self.eot] = -np.inf  # a timestamp must close the pair (or end)
        stamps = [t for t in generated if t >= tb]
        if stamps:  # timestamps never go backwards
            floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
            logits[tb:floor] = -np.inf
        if not generated:
            logits[:tb] = -np.inf  # start with a timestamp
            logits[tb + max_initial + 1:] = -np.inf
        logprobs = _log_softmax(logits)
        if np.logaddexp.reduce(logprobs[tb:]) > logprobs[:tb].max():
            logits[:tb] = -np.inf

    def _decode(self, encoded: np.ndarray, prompt: list[int], timestamps: bool, temperature: float,
                rng: np.random.Generator, cancel: CancelFlag) -> _Window:
        outputs = self.decoder.run(None, {"input_ids": np.array([prompt], np.int64),
                                          "encoder_hidden_states": encoded})
        names = [o.name for o in self.decoder.get_outputs()]
        present = dict(zip(names, outputs, strict=True))
        logits = present.pop("logits")
        sot_index = prompt.index(self.sot)
        no_speech = 0.0
        if self.no_speech is not None:
            no_speech = float(np.exp(_log_softmax(logits[0, sot_index].astype(np.float64))[self.no_speech]))
        cache = {name.replace("present", "past_key_values"): value for name, value in present.items()}
        step_logits = logits[0, -1].astype(np.float64)
        generated: list[int] = []
        total_logprob = 0.0
        limit = min(MAX_WINDOW_TOKENS, self.max_target - len(prompt) - 1)
        while len(generated) < limit and not cancel.is_set():
            self._apply_rules(step_logits, generated, timestamps, max_initial=int(1.0 / TIME_PRECISION))
            logprobs = _log_softmax(step_logits)
            if temperature > 0:
                probs = np.exp(_log_softmax(step_logits / temperature))
                token = int(rng.choice(len(probs), p=probs / probs.sum()))
            else:
                token = int(np.argmax(step_logits))
            total_logprob += float(logprobs[token])
            if token == self.eot:
                break
            generated.append(token)
            feed = {"input_ids": np.array([[token]], np.int64), **{n: cache[n] for n in self.past_inputs}}
            outputs = self.decoder_past.run(None, feed)
            for name, value in zip([o.name for o in self.decoder_past.get_outputs()], outputs, strict=True):
                if name == "logits":
                    step_logits = value[0, -1].astype(np.float64)
                else:
                    cache[name.replace("present", "past_key_values")] = value
        text = self.tokenizer.decode([t for t in generated if t < self.eot])
        return _Window(generated, total_logprob / (len(generated) + 1), no_speech, temperature, text)

    def _decode_with_fallback(self, encoded: np.ndarray, prompt: list[int], timestamps: bool, temperature: float,
                              rng: np.random.Generator, cancel: CancelFlag) -> _Window:
        result = self._decode(encoded, prompt, timestamps, temperature, rng, cancel)
        for fallback in (t for t in FALLBACK_TEMPERATURES if t > temperature):
            repetitive = result.compression_ratio > COMPRESSION_THRESHOLD
            unsure = result.avg_logprob < LOGPROB_THRESHOLD and result.no_speech_prob <= NO_SPEECH_THRESHOLD
            if cancel.is_set() or not (repetitive or unsure):
                break
            result = self._decode(encoded, prompt, timestamps, fallback, rng, cancel)
        return result

    def transcribe(self, audio: AudioSource, *, language: str | None, task: str, prompt: str | None,
                   temperature: float, cancel: CancelFlag) -> Transcript:
        """Transcribe (or translate) a 16 kHz mono clip of any length. The clip is pulled one 30 s window at
        a time, so memory does not grow with its length; a window of digital silence is skipped unheard."""
        rng = np.random.default_rng(0)
        previous = self.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False).ids if prompt else []
        segments: list[Segment] = []
        seek = 0
        while not cancel.is_set():
            samples = audio.read(seek * HOP, seek * HOP + N_SAMPLES)
            span = min(N_FRAMES, len(samples) // HOP)
            if span == 0:
                break
            if not np.any(np.abs(samples) > SILENCE):
                seek += span
                continue
            encoded = self._encode(window_features(samples, self.n_mels)[None])
            if language is None:
                language = self.detect_language(encoded)
                log.info("model %s: detected language %s", self.name, language)
            tokens_prompt = self._prompt(language, task, True, previous)
            result = self._decode_with_fallback(encoded, tokens_prompt, True, temperature, rng, cancel)
            if result.no_speech_prob > NO_SPEECH_THRESHOLD and result.avg_logprob < LOGPROB_THRESHOLD:
                seek += span  # silence: skip the window
                continue
            new, advance = self._segments(result, seek, span, len(segments))
            segments += [s for s in new if s.text.strip()]
            # Like Whisper: text decoded at a high temperature is not trusted as the next window's prompt.
            previous = [] if result.temperature > 0.5 else previous + [t for t in result.tokens if t < self.eot]
            seek += max(advance, 1)
        text = "".join(s.text for s in segments).strip()
        return Transcript(text, language or "en", audio.duration, segments)

    def _segments(self, result: _Window, seek: int, span: int, first_id: int) -> tuple[list[Segment], int]:
        """Split a window's tokens at timestamp pairs; return the segments and how far to move ``seek``."""
        tokens, tb = result.tokens, self.timestamp_begin
        offset = seek / FRAMES_PER_SECOND
        is_ts = [t >= tb for t in tokens]
        single_ending = len(tokens) >= 2 and is_ts[-1] and not is_ts[-2]
        cuts = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]
        segments: list[Segment] = []

        def add(part: list[int], start: float, end: float) -> None:
            text = self.tokenizer.decode([t for t in part if t < self.eot])
            segments.append(Segment(first_id + len(segments), seek, round(offset + start, 3), round(offset + end, 3),
                                    text, part, result.temperature, result.avg_logprob, result.compression_ratio,
                                    result.no_speech_prob))

        if cuts:
            if single_ending:
                cuts.append(len(tokens))
            last = 0
            for cut in cuts:
                part = tokens[last:cut]
                add(part, (part[0] - tb) * TIME_PRECISION, (part[-1] - tb) * TIME_PRECISION)
                last = cut
            if single_ending:
                return segments, span
            return segments, int((tokens[last - 1] - tb) * TIME_PRECISION * FRAMES_PER_SECOND)
        stamps = [t for t in tokens if t >= tb]
        end = span / FRAMES_PER_SECOND
        if stamps and stamps[-1] != tb:
            end = (stamps[-1] - tb) * TIME_PRECISION
        add(tokens, 0.0, end)
        return segments, span

    def close(self) -> None:
        self.encoder = self.decoder = self.decoder_past = None


def load(cfg: ModelConfig, settings: ServerSettings) -> WhisperEngine:
    return WhisperEngine(cfg, settings)

