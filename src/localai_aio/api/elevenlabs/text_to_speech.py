"""ElevenLabs' text-to-speech API, for its SDKs: POST /v1/text-to-speech/{voice_id} (and ``/stream``),
the timed variants ``/with-timestamps`` and ``/stream/with-timestamps``, and GET /v1/voices.

``output_format`` is honoured as ElevenLabs names it: codec, sample rate and, for MP3, the bitrate
(``mp3_44100_128``, ``mp3_22050_32``, ``pcm_16000``, ``ulaw_8000``, ...). The timed answers give each
character of the text its start and end from the phoneme durations the voice computes
(``audio.speech_timing``); streamed, each sentence comes as one JSON line with its audio and its characters.
Errors on these routes are in ElevenLabs' ``{"detail": {"status", "message"}}`` shape (``server.error_responses``).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs

from localai_aio.api.common import json_route, registry
from localai_aio.api.speech_jobs import Utterance, speak, speed_of, spoken, spoken_text, tts_model
from localai_aio.audio.codecs import FORMATS
from localai_aio.audio.speech_timing import alignment
from localai_aio.errors import InvalidRequest
from localai_aio.server import keys
from localai_aio.server.openapi import answers

routes = web.RouteTableDef()

OUTPUT_FORMAT = re.compile(r"^(mp3|pcm|wav|opus|flac|aac|ulaw|alaw)_(\d{4,6})(?:_(\d+))?$")
#: MP3 bitrates (kbps) by sample rate: MPEG-1 above 24 kHz, MPEG-2 from 16 to 24 kHz, MPEG-2.5 below.
MP3_KBPS = {"mpeg1": (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
            "mpeg2": (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
            "mpeg25": (8, 16, 24, 32, 40, 48, 56, 64)}
DEFAULT_OUTPUT = "mp3_44100_128"


def _mp3_family(rate: int) -> str:
    return "mpeg1" if rate >= 32000 else "mpeg2" if rate >= 16000 else "mpeg25"


def _utterance(request: web.Request) -> Utterance:
    body = request[keys.BODY]
    text = spoken_text(body, "text" if "text" in body else "input")
    output = request.query.get("output_format", DEFAULT_OUTPUT)
    match = OUTPUT_FORMAT.match(output)
    if not match or not 8000 <= int(match.group(2)) <= 48000:
        raise InvalidRequest(f"Invalid value for 'output_format': {output!r} (e.g. mp3_44100_128, pcm_16000, "
                             "ulaw_8000)", param="output_format")
    codec, rate, kbps = match.group(1), int(match.group(2)), match.group(3)
    fmt = FORMATS[codec]
    if fmt.fixed_rate and rate != fmt.fixed_rate:
        raise InvalidRequest(f"Invalid value for 'output_format': {codec} is {fmt.fixed_rate} Hz only",
                             param="output_format")
    if codec == "mp3" and kbps is not None:
        allowed = MP3_KBPS[_mp3_family(rate)]
        if int(kbps) not in allowed:
            raise InvalidRequest(f"Invalid value for 'output_format': MP3 at {rate} Hz takes "
                                 f"{', '.join(map(str, allowed))} kbps", param="output_format")
        fmt = fmt.with_bit_rate(int(kbps) * 1000)
    settings = body.get("voice_settings") or {}
    if not isinstance(settings, dict):
        raise InvalidRequest("Invalid value for 'voice_settings': must be an object", param="voice_settings")
    speed = speed_of({"speed": settings.get("speed", 1.0)})
    cfg, voice = tts_model(request, body.get("model_id") or body.get("model"), request.match_info["voice_id"])
    return Utterance(cfg, text, voice, speed, fmt, rate)


def _timed_part(data: bytes, times: list | None) -> dict[str, Any]:
    timed = alignment(times or [])
    return {"audio_base64": base64.b64encode(data).decode("ascii"), "alignment": timed,
            "normalized_alignment": timed}


_ERRORS = {"default": {"description": "An ElevenLabs-style error", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ElevenLabsError"}}}}}
SPEECH_DOCS = {"use_case": "tts", "responses": {**answers(content_type="audio/*"), **_ERRORS}}


@routes.post("/v1/text-to-speech/{voice_id}")
@json_route("post", "/v1/text-to-speech/{voice-id}", "audio", **SPEECH_DOCS)
async def text_to_speech(request: web.Request) -> web.StreamResponse:
    return await speak(request, _utterance(request))


@routes.post("/v1/text-to-speech/{voice_id}/stream")
@json_route("post", "/v1/text-to-speech/{voice-id}", "audio", summary="ElevenLabs' streamed text to speech.",
            **SPEECH_DOCS)
async def text_to_speech_stream(request: web.Request) -> web.StreamResponse:
    return await speak(request, _utterance(request))


@routes.post("/v1/text-to-speech/{voice_id}/with-timestamps")
@json_route("post", "/v1/text-to-speech/{voice-id}", "audio", summary="Speech with the time of each character.",
            use_case="tts", responses={**answers("AudioWithTimestamps"), **_ERRORS})
async def text_to_speech_timed(request: web.Request) -> web.Response:
    audio, times = bytearray(), []
    async with spoken(request.app, _utterance(request), timed=True) as parts:
        async for data, part_times in parts:
            audio += data
            times += part_times
    return web.json_response(_timed_part(bytes(audio), times))


@routes.post("/v1/text-to-speech/{voice_id}/stream/with-timestamps")
@json_route("post", "/v1/text-to-speech/{voice-id}", "audio",
            summary="Streamed speech with the time of each character: one JSON line per sentence.",
            use_case="tts",
            responses={**answers("AudioWithTimestamps", content_type="application/x-ndjson"), **_ERRORS})
async def text_to_speech_stream_timed(request: web.Request) -> web.StreamResponse:
    def line(data: bytes, times: list | None) -> bytes:
        if not data and not times:
            return b""
        return json.dumps(_timed_part(data, times)).encode() + b"\n"

    return await speak(request, _utterance(request), shape=line, content_type="application/x-ndjson")


@routes.get("/v1/voices")
@docs(tags=["audio"], summary="ElevenLabs' voice list: the installed voice models and the voices their YAML "
                              "names.", responses={**answers("VoiceList"), **_ERRORS})
async def voices(request: web.Request) -> web.Response:
    reg = registry(request)
    out = []
    for name in reg.names():
        cfg = reg.config(name)
        if "tts" not in reg.usecases(cfg):
            continue
        labels = {"backend": reg.backend_name(cfg) or "", "model": name}
        out.append(_voice(name, name, labels))
        out += [_voice(f"{name}:{voice}", str(voice), {**labels, "voice": str(voice)})
                for voice in cfg.option("voices") or {}]
    return web.json_response({"voices": out})


def _voice(voice_id: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"voice_id": voice_id, "name": name, "category": "premade", "labels": labels,
            "description": None, "preview_url": None, "available_for_tiers": [], "settings": None}
