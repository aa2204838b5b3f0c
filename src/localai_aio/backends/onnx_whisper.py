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

Word timestamps (``words=True``) are openai-whisper's (``timing.py``): after a window is decoded, the
decoder reads the window's text once more in ``decoder_alignment.onnx`` (exported next to the decoders,
see ``gallery/whisper_alignment.py``), which returns the cross-attention weights of the model's alignment
heads; those are standardised, median-filtered and averaged, and dynamic time warping maps each token
to the 20 ms encoder frames it was read from. Tokens are grouped into words (at spaces, or at unicode
characters for languages written without spaces), punctuation joins its word, and each word gets the
time its first token was reached and the time the next word's was.
"""

from __future__ import annotations

import itertools
import logging
import string
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from localai_aio.backends.base import BackendError, InputRefused, read_json, require_file
from localai_aio.backends.cpu_features import weights_for
from localai_aio.backends.onnx_common import make_session
from localai_aio.backends.whisper_features import FRAMES_PER_SECOND, HOP, N_FRAMES, N_SAMPLES, window_features

if TYPE_CHECKING:
    from localai_aio.audio.codecs import AudioSource
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
ALIGNMENT_FILE = "decoder_alignment.onnx"
ENCODER_FILE = "encoder_model.onnx"
ENCODER_INT8_FILE = "encoder_model.int8.onnx"  # the gallery's int8 encoder, next to the float32 one
TOKENS_PER_SECOND = FRAMES_PER_SECOND // 2  # encoder frames: the encoder halves the mel frame rate
MEDIAN_FILTER_WIDTH = 7
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END = ".。!！?？"
#: Languages written without spaces between words: their words are split at unicode characters.
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


class WordTimestampsUnavailable(InputRefused):
    """Word timestamps were asked of a model folder that has no alignment graph."""

    def __init__(self, model: str):
        super().__init__(
            f"Model '{model}' cannot time words: its folder has no {ALIGNMENT_FILE} (models exported before word "
            f"timestamps existed lack it). Add it with `localai-aio models install {model}` for a gallery model, "
            f"or re-export with `localai-aio models export SOURCE --name {model} --task whisper --force`",
            param="timestamp_granularities")


@dataclass
class Word:
    word: str
    start: float
    end: float


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
    words: list[Word] = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment] = field(default_factory=list)

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]


@dataclass
class _Timing:
    """A word as the alignment found it, before it is placed in its segment (times within the window)."""

    word: str
    tokens: list[int]
    start: float
    end: float


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


@dataclass
class _Start:
    """What the decoder's first call on a window gives every decoding of it (see ``WhisperEngine._start``)."""

    logits: np.ndarray  # the last prompt position's, float64
    no_speech: float
    cache: dict[str, np.ndarray]  # past_key_values.* inputs of the decoder with past


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


# -- word alignment (openai-whisper's timing.py, in numpy) -----------------------------------------------------

def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window of odd ``width`` along the last axis, reflect-padded (as Whisper's), so
    one stray frame of attention does not move a word."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.partition(windows, pad, axis=-1)[..., pad]


def alignment_matrix(weights: np.ndarray, width: int = MEDIAN_FILTER_WIDTH) -> np.ndarray:
    """(heads, tokens, frames) softmaxed cross-attention -> (tokens, frames): each head standardised over the
    tokens at every frame (so a frame every token glances at counts less), median-filtered along time,
    then the heads averaged. One head at a time: the filter's windows are ``width`` times the head."""
    total = np.zeros(weights.shape[1:], np.float64)
    for head in weights.astype(np.float32, copy=False):
        standard = (head - head.mean(axis=0)) / np.maximum(head.std(axis=0), 1e-10)
        total += median_filter(standard, width)
    return total / len(weights)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``cost`` (tokens x frames) from the first cell to the last, moving
    down, right or diagonally; returns the path's (token indices, frame indices). The cells of one
    anti-diagonal depend only on the two before it, so each anti-diagonal is one vectorised step; ties are
    broken as Whisper's ``dtw_cpu`` breaks them."""
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    for diagonal in range(2, n + m + 1):
        i = np.arange(max(1, diagonal - m), min(n, diagonal - 1) + 1)
        j = diagonal - i
        c0, c1, c2 = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        step = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2)).astype(np.int8)
        total[i, j] = cost[i - 1, j - 1] + np.choose(step, [c0, c1, c2])
        trace[i, j] = step
    return _backtrace(trace)


def _backtrace(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    trace = trace.copy()
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = trace.shape[0] - 1, trace.shape[1] - 1
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    rows, cols = np.array(path[::-1]).T
    return rows, cols


def merge_punctuation(words: list[_Timing]) -> None:
    """Opening punctuation joins the word after it and closing punctuation the word before it, in place; the
    emptied entries keep their tokens' count at zero and are skipped later (Whisper's
    ``merge_punctuations``)."""
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        previous, following = words[i], words[j]
        if previous.word.startswith(" ") and previous.word.strip() in PREPEND_PUNCTUATION:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        previous, following = words[i], words[j]
        if not previous.word.endswith(" ") and following.word in APPEND_PUNCTUATION:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def _positive(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BackendError(f"`{key}` must be a whole number of at least 1")
    return value


def encoder_file(folder: Path, cfg: ModelConfig) -> Path:
    """The encoder the YAML's ``encoder_weights`` (int8, fp32 or auto: int8 where the CPU has int8 dot
    products) asks for. A folder with one encoder (a model installed before both were kept, whose encoder
    is int8, or an export of one's own) runs the one it has."""
    weights = weights_for(cfg, "encoder_weights")
    if (folder / ENCODER_INT8_FILE).is_file():
        return folder / (ENCODER_INT8_FILE if weights == "int8" else ENCODER_FILE)
    if cfg.option("encoder_weights"):
        log.info("model %s: the folder has one encoder (%s), which runs whatever encoder_weights says",
                 cfg.name, ENCODER_FILE)
    return folder / ENCODER_FILE


class WhisperEngine:
    def __init__(self, cfg: ModelConfig, settings: ServerSettings):
        from tokenizers import Tokenizer

        folder = require_file(cfg)
        needed = [ENCODER_FILE, "decoder_model.onnx", "decoder_with_past_model.onnx", "tokenizer.json"]
        missing = [name for name in needed if not (folder / name).is_file()]
        if not folder.is_dir() or missing:
            raise BackendError(f"an onnx-whisper model is an optimum-exported folder; missing: {', '.join(missing)}")
        self.name = cfg.name
        config = read_json(folder / "config.json")
        generation = read_json(folder / "generation_config.json")
        self.n_mels = int(config.get("num_mel_bins", 80))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        encoder = encoder_file(folder, cfg)
        self.encoder = make_session(encoder, cfg, settings, spinning=True)
        self.decoder = make_session(folder / "decoder_model.onnx", cfg, settings, spinning=True)
        # One token's step reads every weight once and computes little: bound by memory, not by arithmetic.
        # A second thread did not make it faster here, and waited for the core the other process had.
        self.decoder_past = make_session(folder / "decoder_with_past_model.onnx", cfg, settings, spinning=True,
                                         threads=_positive(cfg.option("decoder_threads", 1), "decoder_threads"))
        self.decoder_outputs = [o.name for o in self.decoder.get_outputs()]
        self.past_inputs = [i.name for i in self.decoder_past.get_inputs() if i.name.startswith("past_key_values")]
        self.past_outputs = [o.name for o in self.decoder_past.get_outputs()]

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
        # Windows encoded in one run (see _window). On the CPU a batch of two took as long as the two one after
        # the other, and the windows run ahead are wasted whenever a window ends early: one at a time there.
        # On a GPU, with float32 weights, 4. int8 quantizes each run's activations with one scale, so an int8
        # encoder's batch may change a word: one at a time unless the YAML says otherwise.
        batched = self.encoder.get_providers() != ["CPUExecutionProvider"] and encoder.name != ENCODER_INT8_FILE
        self.encoder_batch = _positive(cfg.option("encoder_batch", 4 if batched else 1), "encoder_batch")
        alignment = folder / ALIGNMENT_FILE
        # Optional: only word timestamps need it, and folders exported before them lack it.
        self.aligner = make_session(alignment, cfg, settings, spinning=True) if alignment.is_file() else None

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

    def _start(self, encoded: np.ndarray, prompt: list[int]) -> _Start:
        """The decoder's first call on a window: the prompt's logits, the self-attention cache and the
        cross-attention keys and values of the window's encoding. The same for every temperature tried."""
        outputs = self.decoder.run(None, {"input_ids": np.array([prompt], np.int64),
                                          "encoder_hidden_states": encoded})
        present = dict(zip(self.decoder_outputs, outputs, strict=True))
        logits = present.pop("logits")
        no_speech = 0.0
        if self.no_speech is not None:
            row = logits[0, prompt.index(self.sot)].astype(np.float64)
            no_speech = float(np.exp(_log_softmax(row)[self.no_speech]))
        cache = {name.replace("present", "past_key_values"): value for name, value in present.items()}
        return _Start(logits[0, -1].astype(np.float64), no_speech, cache)

    def _decode(self, start: _Start, prompt: list[int], timestamps: bool, temperature: float,
                rng: np.random.Generator, cancel: CancelFlag) -> _Window:
        """Greedy (or sampled, above temperature 0) decoding of one window from its first call."""
        cache = dict(start.cache)
        step_logits = start.logits.copy()
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
            for name, value in zip(self.past_outputs, outputs, strict=True):
                if name == "logits":
                    step_logits = value[0, -1].astype(np.float64)
                else:
                    cache[name.replace("present", "past_key_values")] = value
        text = self.tokenizer.decode([t for t in generated if t < self.eot])
        return _Window(generated, total_logprob / (len(generated) + 1), start.no_speech, temperature, text)

    def _decode_with_fallback(self, encoded: np.ndarray, prompt: list[int], timestamps: bool, temperature: float,
                              rng: np.random.Generator, cancel: CancelFlag) -> _Window:
        start = self._start(encoded, prompt)
        result = self._decode(start, prompt, timestamps, temperature, rng, cancel)
        for fallback in (t for t in FALLBACK_TEMPERATURES if t > temperature):
            repetitive = result.compression_ratio > COMPRESSION_THRESHOLD
            unsure = result.avg_logprob < LOGPROB_THRESHOLD and result.no_speech_prob <= NO_SPEECH_THRESHOLD
            if cancel.is_set() or not (repetitive or unsure):
                break
            result = self._decode(start, prompt, timestamps, fallback, rng, cancel)
        return result

    def transcribe(self, audio: AudioSource, *, language: str | None, task: str, prompt: str | None,
                   temperature: float, cancel: CancelFlag, words: bool = False) -> Transcript:
        """Transcribe (or translate) a 16 kHz mono clip of any length. The clip is pulled one 30 s window at
        a time, so memory does not grow with its length; a window of digital silence is skipped unheard.
        ``words``: also time each word (``Segment.words``), in the same pass over each window."""
        if words and self.aligner is None:
            raise WordTimestampsUnavailable(self.name)
        rng = np.random.default_rng(0)
        last_speech = 0.0
        previous = self.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False).ids if prompt else []
        segments: list[Segment] = []
        seek = 0
        ahead: dict[int, tuple[int, np.ndarray | None]] = {}
        while not cancel.is_set():
            span, encoded = self._window(audio, seek, ahead)
            if span == 0:
                break
            if encoded is None:  # digital silence
                seek += span
                continue
            if language is None:
                language = self.detect_language(encoded)
                log.info("model %s: detected language %s", self.name, language)
            tokens_prompt = self._prompt(language, task, True, previous)
            result = self._decode_with_fallback(encoded, tokens_prompt, True, temperature, rng, cancel)
            if result.no_speech_prob > NO_SPEECH_THRESHOLD and result.avg_logprob < LOGPROB_THRESHOLD:
                seek += span  # silence: skip the window
                continue
            new, advance = self._segments(result, seek, span, len(segments))
            if words and not cancel.is_set():
                last_speech = self._time_words(new, encoded, language, task, span, seek, last_speech)
            segments += [s for s in new if s.text.strip()]
            # Like Whisper: text decoded at a high temperature is not trusted as the next window's prompt.
            previous = [] if result.temperature > 0.5 else previous + [t for t in result.tokens if t < self.eot]
            seek += max(advance, 1)
        text = "".join(s.text for s in segments).strip()
        _in_order([w for s in segments for w in s.words])
        return Transcript(text, language or "en", audio.duration, segments)

    def _window(self, audio: AudioSource, seek: int, ahead: dict[int, tuple[int, np.ndarray | None]],
                ) -> tuple[int, np.ndarray | None]:
        """The window at ``seek``: its span in mel frames (0: the clip has ended) and its encoding (None: digital
        silence, never encoded). With ``encoder_batch`` above 1 the windows that follow it back to back are
        encoded in the same run and kept in ``ahead``: a window decoded to its very end (its last segment
        closed, or no timestamps) is followed by exactly the next one; other ahead windows are dropped. Memory
        holds ``encoder_batch`` windows at most, however long the clip."""
        if seek in ahead:
            return ahead.pop(seek)
        ahead.clear()
        samples = audio.read(seek * HOP, seek * HOP + self.encoder_batch * N_SAMPLES)
        found: list[tuple[int, int, np.ndarray | None]] = []
        for k in range(self.encoder_batch):
            part = samples[k * N_SAMPLES:(k + 1) * N_SAMPLES]
            span = min(N_FRAMES, len(part) // HOP)
            if span == 0:
                break
            found.append((seek + k * N_FRAMES, span, part if np.any(np.abs(part) > SILENCE) else None))
            if span < N_FRAMES:
                break
        if not found:
            return 0, None
        loud = [part for _, _, part in found if part is not None]
        encoded = iter(self._encode(np.stack([window_features(p, self.n_mels) for p in loud])) if loud else ())
        for start, span, part in found:
            ahead[start] = (span, None if part is None else next(encoded)[None])
        return ahead.pop(seek)

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

    # -- word timestamps -----------------------------------------------------------------------------------------

    def _align(self, encoded: np.ndarray, prefix: list[int], text_tokens: list[int], span: int,
               language: str) -> list[_Timing]:
        """Words of ``text_tokens`` with their times in the window (openai-whisper's ``find_alignment``).
        ``prefix`` is the start-of-transcript sequence ending in <|notimestamps|>: the text is read without
        its timestamp tokens, as Whisper aligns it."""
        frames = span // 2
        if not text_tokens or frames < 1:
            return []
        ids = np.array([prefix + text_tokens + [self.eot]], np.int64)
        weights = self.aligner.run(None, {"input_ids": ids, "encoder_hidden_states": encoded})[0]
        # The row of a token is where the decoder looked while predicting the next one; from the
        # <|notimestamps|> row (predicting the first text token) to the last text token (predicting the end).
        matrix = alignment_matrix(weights[:, :, :frames])[len(prefix) - 1:-1]
        rows, cols = dtw(-matrix)
        texts, groups = self._split_words(text_tokens + [self.eot], language)
        if len(groups) <= 1:
            return []
        boundaries = np.pad(np.cumsum([len(g) for g in groups[:-1]]), (1, 0))
        jumps = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
        jump_times = cols[jumps] / TOKENS_PER_SECOND
        starts, ends = jump_times[boundaries[:-1]], jump_times[boundaries[1:]]
        return [_Timing(text, group, float(start), float(end))
                for text, group, start, end in zip(texts, groups, starts, ends, strict=False)]

    def _split_words(self, tokens: list[int], language: str) -> tuple[list[str], list[list[int]]]:
        """Tokens grouped into words: at spaces (and around punctuation), or at every complete unicode
        character for languages written without spaces."""
        texts, groups = self._split_on_unicode(tokens)
        if language in UNSPACED_LANGUAGES:
            return texts, groups
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for text, group in zip(texts, groups, strict=True):
            starts_word = group[0] >= self.eot or text.startswith(" ") or text.strip() in string.punctuation
            if starts_word or not words:
                words.append(text)
                word_tokens.append(list(group))
            else:
                words[-1] += text
                word_tokens[-1].extend(group)
        return words, word_tokens

    def _split_on_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Tokens grouped so that each group decodes to whole characters (a character's UTF-8 bytes may be
        spread over several byte-level tokens)."""
        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode([t for t in ids if t < self.eot])

        full = decode(tokens)
        texts: list[str] = []
        groups: list[list[int]] = []
        current: list[int] = []
        offset = 0
        for token in tokens:
            current.append(token)
            text = decode(current)
            if "\ufffd" not in text or full[offset + text.index("\ufffd"):][:1] == "\ufffd":
                texts.append(text)
                groups.append(current)
                current = []
                offset += len(text)
        return texts, groups

    def _time_words(self, segments: list[Segment], encoded: np.ndarray, language: str, task: str, span: int,
                    seek: int, last_speech: float) -> float:
        """Give each of a window's segments its ``words`` (openai-whisper's ``add_word_timestamps``): absolute
        times, inside the segment and the window. Returns when speech last ended, for the next window."""
        per_segment = [[t for t in s.tokens if t < self.eot] for s in segments]
        prefix = self._prompt(language, task, False, [])  # no previous text: the window's own text is aligned
        alignment = self._align(encoded, prefix, list(itertools.chain.from_iterable(per_segment)), span, language)
        durations = np.array([t.end - t.start for t in alignment])
        durations = durations[durations.nonzero()]
        median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
        longest = median * 2
        if len(durations):  # a sentence's final mark, or the word after it, may swallow a pause: cut them
            for i in range(1, len(alignment)):
                if alignment[i].end - alignment[i].start > longest:
                    if alignment[i].word in SENTENCE_END:
                        alignment[i].end = alignment[i].start + longest
                    elif alignment[i - 1].word in SENTENCE_END:
                        alignment[i].start = alignment[i].end - longest
        merge_punctuation(alignment)
        offset = seek / FRAMES_PER_SECOND
        window_end = offset + span / FRAMES_PER_SECOND
        timings = iter(alignment)
        for segment, tokens in zip(segments, per_segment, strict=True):
            words: list[Word] = []
            taken = 0
            while taken < len(tokens) and (timing := next(timings, None)) is not None:
                if timing.word.strip():
                    words.append(Word(timing.word, round(offset + timing.start, 2), round(offset + timing.end, 2)))
                taken += len(timing.tokens)
            if words:
                _shorten_after_pause(words, last_speech, median, longest)
                _place(words, (segment.start, segment.end), (offset, window_end))
                last_speech = words[-1].end
            segment.words = words
        return last_speech

    def close(self) -> None:
        self.encoder = self.decoder = self.decoder_past = self.aligner = None


def _shorten_after_pause(words: list[Word], last_speech: float, median: float, longest: float) -> None:
    """After a pause, the attention of a segment's first word often spreads over the silence before it, so
    the word would start too early: its length (and the second word's) is cut to twice the median word
    length, as Whisper does."""
    first = words[0]
    if first.end - last_speech <= median * 4:
        return
    if first.end - first.start <= longest and (len(words) < 2 or words[1].end - first.start <= longest * 2):
        return
    if len(words) > 1 and words[1].end - words[1].start > longest:
        boundary = max(words[1].end / 2, words[1].end - longest)
        first.end = words[1].start = round(boundary, 2)
    first.start = round(max(0.0, first.end - longest), 2)


def _place(words: list[Word], segment: tuple[float, float], window: tuple[float, float]) -> None:
    """Clamp a segment's words into the segment, then into the window's audio (which wins: a segment's
    timestamps may run past the end of the clip, a word never does)."""
    def clamp(value: float) -> float:
        return min(max(min(max(value, segment[0]), segment[1]), window[0]), window[1])

    for word in words:
        word.start, word.end = clamp(word.start), clamp(word.end)


def _in_order(words: list[Word]) -> None:
    """Starts and ends never go backwards, and no word ends before it starts: what clients assume of word
    timestamps, whatever the heuristics above did at a segment's edge."""
    start = end = 0.0
    for word in words:
        word.start = start = max(word.start, start)
        word.end = end = max(word.end, word.start, end)


def load(cfg: ModelConfig, settings: ServerSettings) -> WhisperEngine:
    return WhisperEngine(cfg, settings)

