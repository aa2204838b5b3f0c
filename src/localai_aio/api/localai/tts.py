"""POST /tts: LocalAI's text to speech, a WAV streamed a sentence at a time."""

from __future__ import annotations

from aiohttp import web

from localai_aio.api.common import json_route
from localai_aio.api.speech_jobs import Utterance, speak, speed_of, spoken_text, tts_model
from localai_aio.audio.codecs import FORMATS
from localai_aio.server import keys
from localai_aio.server.openapi import answers

routes = web.RouteTableDef()


@routes.post("/tts")
@json_route("post", "/v1/audio/speech", "audio", summary="LocalAI's text to speech (WAV).", use_case="tts",
            responses=answers(content_type="audio/wav"))
async def localai_tts(request: web.Request) -> web.StreamResponse:
    body = request[keys.BODY]
    cfg, voice = tts_model(request, body.get("model"), body.get("voice"))
    job = Utterance(cfg, spoken_text(body, "input"), voice, speed_of(body), FORMATS["wav"], None)
    return await speak(request, job)
