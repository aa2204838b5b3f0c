"""POST /v1/audio/speech (and LocalAI's /audio/speech): OpenAI's text to speech, streamed a sentence at a time."""

from __future__ import annotations

from aiohttp import web

from localai_aio.api.common import json_route
from localai_aio.api.speech_jobs import Utterance, speak, speed_of, spoken_text, tts_model
from localai_aio.audio.codecs import FORMATS, OPENAI_FORMATS
from localai_aio.errors import InvalidRequest
from localai_aio.server import keys
from localai_aio.server.openapi import answers

#: OpenAI's raw ``pcm`` is 24 kHz 16-bit mono whatever the voice: players built for it assume that rate.
OPENAI_PCM_RATE = 24000
routes = web.RouteTableDef()


@routes.post("/v1/audio/speech")
@routes.post("/audio/speech")
@json_route("post", "/v1/audio/speech", "audio", use_case="tts", responses=answers(content_type="audio/*"))
async def audio_speech(request: web.Request) -> web.StreamResponse:
    body = request[keys.BODY]
    text = spoken_text(body, "input")
    speed = speed_of(body)
    name = body.get("response_format", "mp3")
    if name not in OPENAI_FORMATS:
        raise InvalidRequest(f"Invalid value for 'response_format': {name!r}; supported: "
                             f"{', '.join(OPENAI_FORMATS)}", param="response_format")
    cfg, voice = tts_model(request, body.get("model"), body.get("voice"))
    return await speak(request, Utterance(cfg, text, voice, speed, FORMATS[name],
                                          OPENAI_PCM_RATE if name == "pcm" else None))
