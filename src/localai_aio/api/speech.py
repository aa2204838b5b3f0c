"""Text to speech: OpenAI's POST /v1/audio/speech, ElevenLabs' POST /v1/text-to-speech/{voice-id}, LocalAI's /tts.

Audio is streamed as it is made, one sentence at a time (chunked transfer): the first sentence plays
while the rest is synthesized. A client that leaves stops the synthesis at the next sentence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from localai_aio import keys
from localai_aio.api.common import json_route, registry, resolve_model
from localai_aio.audio import FORMATS, AudioFormat, StreamEncoder
from localai_aio.config import ModelConfig
from localai_aio.errors import InvalidRequest
from localai_aio.openapi import answers
from localai_aio.runtime import produced
from localai_aio.sse import write_or_drop

log = logging.getLogger(__name__)
#: OpenAI's raw ``pcm`` is 24 kHz 16-bit mono whatever the voice: players built for it assume that rate.
OPENAI_PCM_RATE = 24000
routes = web.RouteTableDef()

MAX_INPUT = 4096
ELEVENLABS_FORMAT = re.compile(r"^(mp3|pcm|wav|opus|flac|aac)_(\d{4,6})(?:_(\d+))?$")


def _text(body: dict[str, Any], key: str) -> str:
    text = body.get(key)
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"'{key}' is required and must not be empty", param=key)
    if len(text) > MAX_INPUT:
        raise InvalidRequest(f"'{key}' is {len(text)} characters long; at most {MAX_INPUT}", param=key)
    return text


def _speed(body: dict[str, Any]) -> float:
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or math.isnan(speed) or not 0.25 <= speed <= 4.0:
        raise InvalidRequest("Invalid value for 'speed': must be a number from 0.25 to 4.0", param="speed")
    return float(speed)


def _tts_model(request: web.Request, model: Any, voice: Any) -> tuple[ModelConfig, str | None]:
    """The TTS model to use; a ``voice`` naming another configured voice model selects that model."""
    reg = registry(request)
    if isinstance(voice, str) and voice and voice in set(reg.names()) | set(reg.aliases()):
        candidate = reg.config(voice)
        if "tts" in reg.usecases(candidate):
            return candidate, None
    cfg = resolve_model(request, model, "tts")
    return cfg, voice if isinstance(voice, str) and voice else None


async def speak(request: web.Request, cfg: ModelConfig, *, text: str, voice: str | None, speed: float,
                fmt: AudioFormat, rate: int | None) -> web.StreamResponse:
    app = request.app
    started = time.perf_counter()
    sentences = 0

    async def synthesize(put: Callable[[bytes | None], None]) -> None:
        """Hold the voice only while synthesizing: ``put`` None once the voice is known, then the audio.
        The audio waits for the client here, not in the engine (a text's audio is bounded by the input)."""
        async with app[keys.REGISTRY].acquire(cfg.name) as handle:
            engine = handle.engine
            from localai_aio.backends.piper_tts import UnknownVoice

            try:
                speaker = engine.speaker_for(voice)
            except UnknownVoice as exc:
                raise InvalidRequest(str(exc), param="voice") from None
            put(None)

            def encoded(cancel):  # noqa: ANN001, ANN202 - on the engine's thread: synthesis and encoding together
                encoder = StreamEncoder(fmt, engine.sample_rate, rate)
                for samples in engine.synthesize(text, speaker=speaker, speed=speed, cancel=cancel):
                    yield encoder.feed(samples)
                yield encoder.finish()

            chunks = handle.iterate(encoded)
            try:
                async for data in chunks:
                    put(data)
            finally:
                await chunks.aclose()
                app[keys.METRICS].inference.labels(cfg.name, "speech").observe(time.perf_counter() - started)

    response = web.StreamResponse(headers={"Content-Type": fmt.content_type,
                                           "X-Request-ID": request.get(keys.REQUEST_ID, "")})
    response.enable_chunked_encoding()
    timeout = app[keys.SETTINGS].write_timeout
    try:
        async with contextlib.aclosing(produced(synthesize)) as audio:
            await anext(audio)  # a bad voice is a plain 400 before any audio
            await response.prepare(request)
            async for data in audio:
                sentences += 1
                if data:
                    await write_or_drop(request, response, data, timeout)
            sentences -= 1  # the last item is the encoder's tail, not a sentence
            await response.write_eof()
    except (ConnectionResetError, OSError, asyncio.CancelledError) as exc:
        log.info("client left during speech from %s after %d sentence(s); synthesis stopped", cfg.name, sentences)
        if isinstance(exc, asyncio.CancelledError):
            raise
    except Exception:
        if not response.prepared:
            raise
        # The audio headers are out; an error body cannot follow. Cut the stream so the client sees it end.
        log.exception("speech from %s failed after %d sentence(s) (request id %s)", cfg.name, sentences,
                      request.get(keys.REQUEST_ID))
        if request.transport is not None:
            request.transport.abort()
    finally:
        app[keys.METRICS].tts_sentences.labels(cfg.name).inc(max(sentences, 0))
    return response


@routes.post("/v1/audio/speech")
@routes.post("/audio/speech")
@json_route("post", "/v1/audio/speech", "audio", use_case="tts", responses=answers(content_type="audio/*"))
async def audio_speech(request: web.Request) -> web.StreamResponse:
    body = request["data"]
    text = _text(body, "input")
    speed = _speed(body)
    name = body.get("response_format", "mp3")
    if name not in FORMATS:
        raise InvalidRequest(f"Invalid value for 'response_format': {name!r}; supported: {', '.join(FORMATS)}",
                             param="response_format")
    cfg, voice = _tts_model(request, body.get("model"), body.get("voice"))
    return await speak(request, cfg, text=text, voice=voice, speed=speed, fmt=FORMATS[name],
                       rate=OPENAI_PCM_RATE if name == "pcm" else None)


@routes.post("/v1/text-to-speech/{voice_id}")
@json_route("post", "/v1/text-to-speech/{voice-id}", "audio", use_case="tts",
            responses=answers(content_type="audio/*"))
async def elevenlabs_speech(request: web.Request) -> web.StreamResponse:
    body = request["data"]
    text = _text(body, "text" if "text" in body else "input")
    output = request.query.get("output_format", "mp3_44100_128")
    match = ELEVENLABS_FORMAT.match(output)
    if not match or not 8000 <= int(match.group(2)) <= 48000:
        raise InvalidRequest(f"Invalid value for 'output_format': {output!r} (e.g. mp3_44100_128, pcm_16000)",
                             param="output_format")
    settings = body.get("voice_settings") or {}
    if not isinstance(settings, dict):
        raise InvalidRequest("Invalid value for 'voice_settings': must be an object", param="voice_settings")
    speed = _speed({"speed": settings.get("speed", 1.0)})
    voice = request.match_info["voice_id"]
    cfg, voice = _tts_model(request, body.get("model_id") or body.get("model"), voice)
    return await speak(request, cfg, text=text, voice=voice, speed=speed, fmt=FORMATS[match.group(1)],
                       rate=int(match.group(2)))


@routes.post("/tts")
@json_route("post", "/v1/audio/speech", "audio", summary="LocalAI's text to speech (WAV).", use_case="tts",
            responses=answers(content_type="audio/wav"))
async def localai_tts(request: web.Request) -> web.StreamResponse:
    body = request["data"]
    cfg, voice = _tts_model(request, body.get("model"), body.get("voice"))
    return await speak(request, cfg, text=_text(body, "input"), voice=voice, speed=_speed(body),
                       fmt=FORMATS["wav"], rate=None)
