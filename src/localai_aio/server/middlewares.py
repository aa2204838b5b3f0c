"""Request-level middlewares: request id + access log + metrics, access (Host, Origin, API keys), body checks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from marshmallow import Schema, ValidationError

from localai_aio.errors import (
    AuthenticationFailed,
    InvalidRequest,
    PermissionDenied,
    UnsupportedMediaType,
    body_too_large,
)
from localai_aio.principal import ANONYMOUS
from localai_aio.runtime import run_sized
from localai_aio.server import keys
from localai_aio.server.access import ADMIN_ONLY
from localai_aio.server.validation import raise_validation_error

access_log = logging.getLogger("localai_aio.access")

#: Paths that answer without an API key: health probes, the API documentation and the web UI's page.
PUBLIC_PATHS = ("/healthz", "/readyz", "/swagger.json", "/")
# Generated images' 128-bit random names are the capability to fetch them, so links work in any client.
# The web UI's static files are public too (it asks for a key once the API behind it answers 401).
PUBLIC_PREFIXES = ("/swagger/", "/generated-images/", "/ui/assets/")

#: Set on handlers whose body is a JSON object: the schema that validates it (``api.common.json_route``), or
#: True for a route that reads the object itself.
EXPECTS_JSON = "__localai_expects_json__"
#: Bodies larger than this are parsed and validated on a worker thread: a 10 MB prompt or a conversation
#: of 20,000 messages takes the event loop, which writes every stream's tokens, for hundreds of ms.
OFF_LOOP_BYTES = 256 * 1024


def route_label(request: web.Request) -> str:
    """The route's template (``/v1/assistants/{assistant_id}``), so metrics do not explode per id."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None or isinstance(request.match_info.http_exception, web.HTTPException):
        return "unmatched"
    return resource.canonical


@web.middleware
async def request_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line per request (method, path, status, duration, request id) and the HTTP metrics."""
    rid = request.headers.get("X-Request-ID", "")
    if not (0 < len(rid) <= 64 and rid.isprintable()):
        rid = uuid.uuid4().hex
    request[keys.REQUEST_ID] = rid
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers["X-Request-ID"] = rid
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client closed the connection first (nginx's code): not a server error
        raise
    finally:
        elapsed = time.perf_counter() - started
        label = route_label(request)
        metrics = request.app[keys.METRICS]
        metrics.requests.labels(label, request.method, str(status)).inc()
        metrics.latency.labels(label, request.method).observe(elapsed)
        access_log.info("%s %s %d %.1fms rid=%s", request.method, request.path, status, elapsed * 1000, rid,
                        extra={"method": request.method, "path": request.path, "status": status,
                               "duration_ms": round(elapsed * 1000, 2), "request_id": rid})


def is_public(request: web.Request) -> bool:
    return request.method == hdrs.METH_OPTIONS or request.path in PUBLIC_PATHS \
        or request.path.startswith(PUBLIC_PREFIXES)


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or request.headers.get("xi-api-key")


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The app's ``access.AccessPolicy`` on every request: the Host (without keys), the Origin of
    state-changing requests, the key (401 without a valid one, except on public paths) and admin-only routes
    (403 for user keys). Handlers and the store learn who asked from ``request[keys.PRINCIPAL]``."""
    policy = request.app[keys.ACCESS]
    policy.check_host(request.path, request.headers.get(hdrs.HOST))
    forwarded = request.headers.get("X-Forwarded-Host", "").split(",")[0]
    policy.check_origin(request.method, request.headers.get(hdrs.ORIGIN), (request.headers.get(hdrs.HOST), forwarded))
    key = presented_key(request)
    principal = policy.identify(key)
    if principal is None:
        if not is_public(request):
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'" if key is None
                                       else "Incorrect API key provided")
        principal = ANONYMOUS
    if getattr(request.match_info.handler, ADMIN_ONLY, False) and not principal.admin:
        raise PermissionDenied(f"{request.method} {request.path} needs an admin key (one of --admin-api-keys); "
                               "this key is a user key")
    request[keys.PRINCIPAL] = principal
    return await handler(request)


@web.middleware
async def body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse oversized bodies before reading them; parse JSON bodies and validate them with the route's
    schema into ``request[keys.BODY]`` (off the event loop when they are large).

    A body without Content-Length (chunked) or sent compressed (its Content-Length is the compressed
    size) is counted as it is read instead: ``request.read`` stops at ``client_max_size`` (app.py), the
    upload limit, as aiohttp decompresses it, and multipart bodies are counted by ``api.multipart``."""
    settings = request.app[keys.SETTINGS]
    if request.content_length is not None and request.content_length > settings.upload_limit_bytes:
        raise body_too_large(settings.upload_limit)
    expects = getattr(request.match_info.handler, EXPECTS_JSON, None)
    if expects:
        schema = expects if isinstance(expects, Schema) else None
        if request.content_type != "application/json":
            raise UnsupportedMediaType(f"Content-Type must be application/json, not "
                                       f"'{request.content_type or 'none'}'")
        raw = await request.read()
        request[keys.BODY] = await run_sized(len(raw) > OFF_LOOP_BYTES, validated_json, raw, schema)
    return await handler(request)


def validated_json(raw: bytes, schema: Schema | None) -> dict[str, Any]:
    """A JSON object body, validated (and shaped) by ``schema`` when there is one; a clear 400 for anything
    else."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    if schema is None:
        return body
    try:
        return schema.load(body)
    except ValidationError as error:
        raise_validation_error(error)
