"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart), in OpenAI's response formats."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs

from localai_aio.api.common import resolve_model
from localai_aio.api.multipart import Upload
from localai_aio.audio.codecs import AudioTooLong, UnreadableAudio, open_audio
from localai_aio.backends.whisper_languages import language_name
from localai_aio.errors import InvalidRequest
from localai_aio.runtime import CancelFlag, run_blocking
from localai_aio.server import keys
from localai_aio.server.openapi import USE_CASE, answers, form_body

routes = web.RouteTableDef()
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
FORM_FIELDS: dict[str, Any] = {
    "file": {"type": "string", "format": "binary", "description": "Audio: wav, flac, ogg/opus, mp3, webm"},
    "model": {"type": "string"}, "language": {"type": "string", "description": "ISO 639-1, e.g. en"},
    "prompt": {"type": "string"}, "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    "response_format": {"type": "string", "enum": list(FORMATS)},
}
GRANULARITIES = {"timestamp_granularities[]": {
    "type": "array", "items": {"type": "string", "enum": ["segment", "word"]},
    "description": "With response_format verbose_json: 'segment' (the default), 'word' (words with their start "
                   "and end; segments only when 'segment' is asked too), or both"}}


async def read_form(request: web.Request) -> tuple[dict[str, list[str]], bytes | None]:
    """Text fields and the ``file`` part's bytes."""
    upload = Upload(request)
    fields: dict[str, list[str]] = {}
    data: bytes | None = None
    async for part in upload.parts():
        value = await upload.read(part)
        if part.name == "file" and data is None:
            data = value
        elif part.name:
            fields.setdefault(part.name, []).append(value.decode("utf-8", "replace"))
    return fields, data


@contextlib.contextmanager
def _refused_audio() -> Iterator[None]:
    """The audio is opened in the executor but decoded lazily on the engine's thread, so a bad file can
    surface in either place; both answer the same 400."""
    try:
        yield
    except UnreadableAudio as exc:
        raise InvalidRequest(f"Unreadable audio: {exc}", param="file") from None
    except AudioTooLong as exc:
        raise InvalidRequest(f"Audio too long: {exc}", param="file", code=exc.code) from None


def _timestamp(seconds: float, separator: str) -> str:
    ms = int(round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def render(result: Any, fmt: str, task: str, granularities: frozenset[str] = frozenset()) -> web.Response:
    if fmt == "text":
        return web.Response(text=result.text + "\n", content_type="text/plain")
    if fmt in ("srt", "vtt"):
        lines = ["WEBVTT", ""] if fmt == "vtt" else []
        for number, s in enumerate(result.segments, 1):
            if fmt == "srt":
                lines.append(str(number))
            sep = "," if fmt == "srt" else "."
            lines += [f"{_timestamp(s.start, sep)} --> {_timestamp(s.end, sep)}", s.text.strip(), ""]
        return web.Response(text="\n".join(lines), content_type="text/vtt" if fmt == "vtt" else "application/x-subrip")
    if fmt == "verbose_json":
        body = {"task": task, "language": language_name(result.language), "duration": round(result.duration, 3),
                "text": result.text}
        if "segment" in granularities or "word" not in granularities:  # as OpenAI: words alone, no segments
            body["segments"] = [{"id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text,
                                 "tokens": s.tokens, "temperature": s.temperature, "avg_logprob": s.avg_logprob,
                                 "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob}
                                for s in result.segments]
        if "word" in granularities:
            body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for w in result.words]
        return web.json_response(body)
    return web.json_response({"text": result.text})


async def _handle(request: web.Request, task: str) -> web.Response:
    fields, data = await read_form(request)

    def field(name: str) -> str | None:
        values = fields.get(name) or fields.get(f"{name}[]")
        return values[0] if values else None

    if data is None:
        raise InvalidRequest("'file' is required", param="file")
    cfg = resolve_model(request, field("model"), "transcript")
    fmt = field("response_format") or "json"
    if fmt not in FORMATS:
        raise InvalidRequest(f"Invalid value for 'response_format': {fmt!r}; one of {', '.join(FORMATS)}",
                             param="response_format")
    granularities = _granularities(fields, fmt, task)
    try:
        temperature = float(field("temperature") or 0.0)
    except ValueError:
        raise InvalidRequest("Invalid value for 'temperature': must be a number", param="temperature") from None
    if not 0.0 <= temperature <= 1.0:
        raise InvalidRequest("Invalid value for 'temperature': must be from 0 to 1", param="temperature")
    language = (field("language") or "").strip().lower() or None
    with _refused_audio():
        audio = await run_blocking(request.app[keys.EXECUTOR], open_audio, data,
                                   request.app[keys.SETTINGS].max_audio_seconds)
    started = time.perf_counter()
    async with request.app[keys.REGISTRY].acquire(cfg.name) as handle:
        engine = handle.engine
        if language is not None and engine.multilingual and language not in engine.languages:
            raise InvalidRequest(f"Unknown language '{language}'; use an ISO 639-1 code such as 'en'",
                                 param="language")
        cancel = CancelFlag()
        try:
            with _refused_audio():
                result = await handle.run(engine.transcribe, audio, language=language, task=task,
                                          prompt=field("prompt"), temperature=temperature, cancel=cancel,
                                          words="word" in granularities)
        finally:
            cancel.set()
            request.app[keys.METRICS].inference.labels(cfg.name, task).observe(time.perf_counter() - started)
    return render(result, fmt, task, granularities)


def _granularities(fields: dict[str, list[str]], fmt: str, task: str) -> frozenset[str]:
    """``timestamp_granularities[]`` as OpenAI takes it: 'segment' is accepted with every format (it is what
    verbose_json gives anyway), while 'word' changes the answer, so it needs verbose_json (OpenAI answers
    400 otherwise); translations have no word timestamps."""
    granularities = frozenset(fields.get("timestamp_granularities[]", []) + fields.get("timestamp_granularities", []))
    if any(g not in ("segment", "word") for g in granularities):
        raise InvalidRequest("Invalid value for 'timestamp_granularities[]': 'segment' or 'word'",
                             param="timestamp_granularities")
    if "word" in granularities and task != "transcribe":
        raise InvalidRequest("Word timestamps are given for transcriptions only", param="timestamp_granularities")
    if "word" in granularities and fmt != "verbose_json":
        raise InvalidRequest("Word timestamps need response_format 'verbose_json'", param="timestamp_granularities")
    return granularities


@routes.post("/v1/audio/transcriptions")
@routes.post("/audio/transcriptions")
@docs(tags=["audio"], summary="Transcribes audio into the input language.",
      requestBody=form_body({**FORM_FIELDS, **GRANULARITIES}, required=["file"]),
      responses=answers("Transcription"), **{USE_CASE: "transcript"})
async def transcriptions(request: web.Request) -> web.Response:
    return await _handle(request, "transcribe")


@routes.post("/v1/audio/translations")
@routes.post("/audio/translations")
@docs(tags=["audio"], summary="Translates audio into English text.",
      requestBody=form_body(FORM_FIELDS, required=["file"]), responses=answers("Transcription"),
      **{USE_CASE: "transcript"})
async def translations(request: web.Request) -> web.Response:
    return await _handle(request, "translate")
