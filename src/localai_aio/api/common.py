"""What every API family shares: schema-validated JSON routes, model resolution, storage calls, ids."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp_apigami import docs, request_schema
from marshmallow import Schema

from localai_aio.config import ModelConfig
from localai_aio.errors import InvalidRequest, NotImplementedForModel, StorageUnavailable
from localai_aio.registry import ModelRegistry
from localai_aio.runtime import run_blocking
from localai_aio.server import keys, openapi
from localai_aio.server.middlewares import EXPECTS_JSON
from localai_aio.server.schemas import body_schema, route_summary
from localai_aio.store.base import StoreUnavailable
from localai_aio.store.blobs import BlobUnavailable

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Any]
T = TypeVar("T")


def json_route(method: str, spec_path: str | None, tag: str, *, schema: type[Schema] | None = None,
               summary: str = "", use_case: str | None = None,
               responses: dict[str, Any] | None = None) -> Callable[[Handler], Handler]:
    """Document a handler with the seed spec's schema for ``spec_path`` (or ``schema`` for routes the
    seed lacks) and validate its JSON body with it. ``use_case`` makes the documented ``model`` the
    models that serve it; ``responses`` (``server.openapi.answers``) documents what comes back.

    The validated body is in ``request[keys.BODY]`` (``server.middlewares.body_middleware`` puts it there).
    """
    body = schema or body_schema(method, spec_path)
    extra: dict[str, Any] = {"responses": responses} if responses else {}
    if use_case:
        extra[openapi.USE_CASE] = use_case

    def wrap(handler: Handler) -> Handler:
        schema = body()
        setattr(handler, EXPECTS_JSON, schema)
        handler = request_schema(schema, location="json", required=True)(handler)  # documents the body
        return docs(tags=[tag], summary=summary or route_summary(method, spec_path), **extra)(handler)

    return wrap


def registry(request: web.Request) -> ModelRegistry:
    return request.app[keys.REGISTRY]


#: What a model that cannot serve a use case is told, by use case.
CANNOT = {
    "chat": "does not do chat completions", "completion": "does not do text completions",
    "embeddings": "does not make embeddings (a GGUF model needs `embeddings: true` in its config)",
    "tts": "does not make speech", "transcript": "does not transcribe audio", "image": "does not generate images",
    "rerank": "does not rerank documents (a cross-encoder: backend onnx-rerank, or a GGUF with `pooling: rank`)",
}


def resolve_model(request: web.Request, name: Any, usecase: str) -> ModelConfig:
    """The config for the request's ``model``, which must serve ``usecase`` (400 otherwise, before any
    engine is loaded); a missing model means the first one for ``usecase``."""
    reg = registry(request)
    if name in (None, ""):
        return reg.first_model(usecase)
    if not isinstance(name, str):
        raise InvalidRequest("`model` must be a string", param="model")
    cfg = reg.config(name)
    if usecase not in reg.usecases(cfg) and not cfg.error:  # a broken config gets its own clear load error
        raise NotImplementedForModel(f"Model '{cfg.name}' {CANNOT[usecase]}", param="model")
    return cfg


async def storage_call(app: web.Application, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run database or blob store work in the thread pool; either one out of reach is a 503 with
    ``Retry-After``, never a 500."""
    try:
        return await run_blocking(app[keys.EXECUTOR], fn, *args, **kwargs)
    except (StoreUnavailable, BlobUnavailable) as exc:
        log.warning("storage unavailable: %s", exc)
        raise StorageUnavailable("Storage is unavailable; retry shortly") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def public_base(request: web.Request) -> str:
    """Where clients reach this server: ``--base-url``, else what a proxy says it forwarded, else the request."""
    configured = request.app[keys.SETTINGS].base_url
    if configured:
        return configured
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    proto = proto if proto in ("http", "https") else request.scheme
    host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or request.host
    return f"{proto}://{host}"
