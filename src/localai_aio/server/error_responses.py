"""The one middleware that renders every failure as an error body in the shape of the route's API.

Every route answers OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the right status;
Anthropic's Messages API routes (``/v1/messages...``) answer Anthropic's ``{"type": "error", "error":
{"type", "message"}}`` and ElevenLabs' routes (``/v1/text-to-speech...``, ``/v1/voices``) its
``{"detail": {"status", "message"}}`` and Ollama's (``/api/...``) its ``{"error": "..."}`` instead, since
their clients read only that. Engines' errors
become API errors through ``errors.from_engine``; anything else is logged with the request id and
answered as a 500 that leaks nothing.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from localai_aio.errors import (
    APIError,
    AuthenticationFailed,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    body_too_large,
    from_engine,
)
from localai_aio.server import keys

log = logging.getLogger(__name__)

#: Routes whose errors are in another API's shape, by that API: the path itself or anything below it.
DIALECTS = {"/v1/messages": "anthropic", "/v1/text-to-speech": "elevenlabs", "/v1/voices": "elevenlabs",
            "/api": "ollama"}


def dialect_of(request: web.Request) -> str:
    """Whose error shape the route speaks: "openai", or another API's (``DIALECTS``)."""
    for path, dialect in DIALECTS.items():
        if request.path == path or request.path.startswith(path + "/"):
            return dialect
    return "openai"


def error_response(err: APIError, request_id: str | None = None, *, dialect: str = "openai") -> web.Response:
    headers = dict(err.headers)
    if request_id:
        headers["X-Request-ID"] = request_id
    return web.json_response(err.body_for(dialect), status=err.status, headers=headers)


_HTTP_ERRORS: dict[int, type[APIError]] = {
    400: InvalidRequest, 401: AuthenticationFailed, 404: NotFound, 405: MethodNotAllowed,
    413: PayloadTooLarge, 415: UnsupportedMediaType,
}


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> APIError:
    """Translate aiohttp's own HTTP errors (router 404/405, body too large, ...) into API errors."""
    if exc.status == 404:
        return NotFound(f"Unknown route: {request.method} {request.path}")
    if exc.status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
        err = MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}"
                               + (f"; allowed: {', '.join(allowed)}" if allowed else ""))
        if allowed:
            err.headers["Allow"] = ",".join(allowed)
        return err
    if exc.status == 413:  # aiohttp's own count (``client_max_size``) while reading a body
        return body_too_large(request.app[keys.SETTINGS].upload_limit)
    cls = _HTTP_ERRORS.get(exc.status)
    if cls is None:
        cls = InternalError if exc.status >= 500 else InvalidRequest
    text = exc.text or exc.reason
    try:  # webargs and friends put JSON in the body
        text = json.dumps(json.loads(text)) if text else exc.reason
    except (TypeError, ValueError):
        pass
    err = cls(text or exc.reason)
    err.status = exc.status
    return err


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as an OpenAI error (Anthropic's or ElevenLabs' on their routes); log
    unexpected ones with the request id, never leak them."""
    dialect = dialect_of(request)
    try:
        return await handler(request)
    except APIError as err:
        return error_response(err, request.get(keys.REQUEST_ID), dialect=dialect)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(exc, request), request.get(keys.REQUEST_ID), dialect=dialect)
    except Exception as exc:
        rid = request.get(keys.REQUEST_ID)
        known = from_engine(exc)
        if known is not None:
            return error_response(known, rid, dialect=dialect)
        log.exception("unexpected error in %s %s (request id %s)", request.method, request.path, rid)
        return error_response(InternalError(f"Internal server error (request id {rid})"), rid, dialect=dialect)
