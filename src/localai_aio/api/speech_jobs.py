"""Text to speech as every protocol's routes share it: OpenAI's POST /v1/audio/speech
(``api.openai.speech``), LocalAI's /tts (``api.localai.tts``) and ElevenLabs' (``api.elevenlabs``).

Audio is streamed as it is made, one sentence at a time (chunked transfer): the first sentence plays
while the rest is synthesized. A client that leaves stops the synthesis at the next sentence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from localai_aio.api.common import registry, resolve_model
from localai_aio.audio.codecs import AudioFormat, StreamEncoder
from localai_aio.audio.speech_timing import character_times, sentences
from localai_aio.backends.families import SpeechEngine
from localai_aio.config import ModelConfig
from localai_aio.errors import InvalidRequest, NotImplementedForModel
from localai_aio.runtime import produced
from localai_aio.server import keys
from localai_aio.server.sse import write_or_drop

log = logging.getLogger(__name__)

MAX_INPUT = 4096


def spoken_text(body: dict[str, Any], key: str) -> str:
    text = body.get(key)
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"'{key}' is required and must not be empty", param=key)
    if len(text) > MAX_INPUT:
        raise InvalidRequest(f"'{key}' is {len(text)} characters long; at most {MAX_INPUT}", param=key)
    return text


def speed_of(body: dict[str, Any]) -> float:
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or math.isnan(speed) or not 0.25 <= speed <= 4.0:
        raise InvalidRequest("Invalid value for 'speed': must be a number from 0.25 to 4.0", param="speed")
    return float(speed)


def tts_model(request: web.Request, model: Any, voice: Any) -> tuple[ModelConfig, str | None]:
    """The TTS model to use; a ``voice`` naming another configured voice model selects that model, and
    ``model:voice`` (ElevenLabs' voice ids) a voice of that model."""
    reg = registry(request)
    known = set(reg.names()) | set(reg.aliases())
    if isinstance(voice, str) and voice and voice in known:
        candidate = reg.config(voice)
        if "tts" in reg.usecases(candidate):
            return candidate, None
    if isinstance(voice, str) and ":" in voice and voice.split(":", 1)[0] in known:
        name, voice = voice.split(":", 1)
        candidate = reg.config(name)
        if "tts" in reg.usecases(candidate):
            return candidate, voice
    cfg = resolve_model(request, model, "tts")
    return cfg, voice if isinstance(voice, str) and voice else None


@dataclass(frozen=True)
class Utterance:
    """What to say and how: a validated speech request."""

    cfg: ModelConfig
    text: str
    voice: str | None
    speed: float
    fmt: AudioFormat
    rate: int | None  # the output's sample rate (None: the voice's own)


def _audio_parts(engine: SpeechEngine, speaker: int | None, job: Utterance, timed: bool) -> Callable[[Any], Iterator]:
    """On the engine's thread: synthesis and encoding together, one sentence at a time. Each part is the
    encoded bytes and, when ``timed``, when each of the sentence's characters is spoken."""
    def parts(cancel):  # noqa: ANN001, ANN202
        encoder = StreamEncoder(job.fmt, engine.sample_rate, job.rate)
        if not timed:
            for samples in engine.synthesize(job.text, speaker=speaker, speed=job.speed, cancel=cancel):
                yield encoder.feed(samples), None
            yield encoder.finish(), None
            return
        offset = 0.0
        for sentence in sentences(job.text):  # one text span per part: its characters get its time
            said = list(engine.synthesize_timed(sentence, speaker=speaker, speed=job.speed, cancel=cancel))
            if cancel.is_set():
                return
            samples = np.concatenate([a for a, _ in said]) if said else np.zeros(0, np.float32)
            phonemes = None if any(t is None for _, t in said) else [p for _, t in said for p in t]
            seconds = len(samples) / engine.sample_rate
            yield encoder.feed(samples), character_times(sentence, phonemes, seconds, offset)
            offset += seconds
        yield encoder.finish(), []
    return parts


@contextlib.asynccontextmanager
async def spoken(app: web.Application, job: Utterance, *, timed: bool = False) -> AsyncIterator[AsyncIterator]:
    """The speech's parts (bytes, character times) as they are made. The voice is checked before this
    yields, so a bad voice is a plain 400 before any audio; the model is held only while synthesizing."""
    started = time.perf_counter()

    async def synthesize(put: Callable[[Any], None]) -> None:
        async with app[keys.REGISTRY].acquire(job.cfg.name) as handle:
            engine = handle.engine
            from localai_aio.backends.piper_tts import UnknownVoice

            try:
                speaker = engine.speaker_for(job.voice)
            except UnknownVoice as exc:
                raise InvalidRequest(str(exc), param="voice") from None
            if timed and not hasattr(engine, "synthesize_timed"):
                raise NotImplementedForModel(f"Model '{job.cfg.name}' cannot time its speech", param="model_id")
            put(None)
            chunks = handle.iterate(_audio_parts(engine, speaker, job, timed))
            try:
                async for part in chunks:
                    put(part)
            finally:
                await chunks.aclose()
                app[keys.METRICS].inference.labels(job.cfg.name, "speech").observe(time.perf_counter() - started)

    async with contextlib.aclosing(produced(synthesize)) as parts:
        await anext(parts)
        yield parts


async def speak(request: web.Request, job: Utterance, *, shape: Callable[[bytes, Any], bytes] | None = None,
                content_type: str | None = None) -> web.StreamResponse:
    """Stream the speech: the audio itself, or each part as ``shape`` writes it (timed when given)."""
    app = request.app
    sentences_sent = 0
    response = web.StreamResponse(headers={"Content-Type": content_type or job.fmt.content_type,
                                           "X-Request-ID": request.get(keys.REQUEST_ID, "")})
    response.enable_chunked_encoding()
    timeout = app[keys.SETTINGS].write_timeout
    try:
        async with spoken(app, job, timed=shape is not None) as parts:
            await response.prepare(request)
            async for data, times in parts:
                sentences_sent += 1
                out = shape(data, times) if shape is not None else data
                if out:
                    await write_or_drop(request, response, out, timeout)
            sentences_sent -= 1  # the last part is the encoder's tail, not a sentence
            await response.write_eof()
    except (ConnectionResetError, OSError, asyncio.CancelledError) as exc:
        log.info("client left during speech from %s after %d sentence(s); synthesis stopped", job.cfg.name,
                 sentences_sent)
        if isinstance(exc, asyncio.CancelledError):
            raise
    except Exception:
        if not response.prepared:
            raise
        # The audio headers are out; an error body cannot follow. Cut the stream so the client sees it end.
        log.exception("speech from %s failed after %d sentence(s) (request id %s)", job.cfg.name, sentences_sent,
                      request.get(keys.REQUEST_ID))
        if request.transport is not None:
            request.transport.abort()
    finally:
        app[keys.METRICS].tts_sentences.labels(job.cfg.name).inc(max(sentences_sent, 0))
    return response
