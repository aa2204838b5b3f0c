"""The application factory: settings in, a ready ``web.Application`` out (no globals)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp_cors
from aiohttp import web
from aiohttp_apigami import setup_aiohttp_apispec

from localai_aio import __version__
from localai_aio.api import gallery_installs
from localai_aio.api.anthropic import messages
from localai_aio.api.elevenlabs import text_to_speech
from localai_aio.api.localai import gallery_jobs, health, rerank, tokenize, tts, ui
from localai_aio.api.ollama import embed as ollama_embed
from localai_aio.api.ollama import generation as ollama_generation
from localai_aio.api.ollama import models as ollama_models
from localai_aio.api.openai import (
    assistants,
    chat,
    completions,
    embeddings,
    files,
    images,
    models,
    responses,
    speech,
    transcription,
)
from localai_aio.backends import default_backends
from localai_aio.backends.base import Backend
from localai_aio.config import ConfigError, ModelConfig, ServerSettings, check_api_keys, load_model_configs
from localai_aio.metrics import Metrics
from localai_aio.registry import ModelRegistry
from localai_aio.runtime import lower_priority, run_blocking
from localai_aio.server import keys, openapi
from localai_aio.server.access import AccessPolicy
from localai_aio.server.error_responses import error_middleware
from localai_aio.server.live_reload import live_reload_ctx
from localai_aio.server.middlewares import access_middleware, body_middleware, request_log_middleware
from localai_aio.server.retention import retention_ctx
from localai_aio.store import blobs, open_store
from localai_aio.store.base import StoreUnavailable
from localai_aio.store.blobs import BlobUnavailable

log = logging.getLogger(__name__)

API_MODULES = (health, models, chat, completions, responses, messages, tokenize, embeddings, rerank, speech, tts,
               text_to_speech, transcription, images, assistants, files, gallery_jobs, ui, ollama_generation,
               ollama_embed, ollama_models)


def _check_config_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"config dir {path} is not writable: {exc.strerror or exc}") from None


async def _executor_ctx(app: web.Application) -> AsyncIterator[None]:
    # Blocking work that is not an engine's (file I/O, the store, audio decoding, parsing big bodies,
    # building prompts): also the loop's default executor. Engines have their own threads
    # (registry.EngineHandle), which this pool's lower priority leaves the cores to first.
    executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="localai-worker", initializer=lower_priority)
    app[keys.EXECUTOR] = executor
    asyncio.get_running_loop().set_default_executor(executor)
    yield
    executor.shutdown(wait=True, cancel_futures=True)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    executor = app[keys.EXECUTOR]
    try:
        app[keys.BLOBS] = blobs.from_url(settings.blob_url, Path(settings.config_dir))
        store = await run_blocking(executor, open_store, settings.database_url, settings.config_dir,
                                   app[keys.BLOBS])
    except (StoreUnavailable, BlobUnavailable, ValueError, RuntimeError) as exc:
        raise ConfigError(str(exc)) from None
    app[keys.STORE] = store
    yield
    await run_blocking(executor, store.close)
    await run_blocking(executor, app[keys.BLOBS].close)


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    reg = ModelRegistry(app[keys.MODEL_CONFIGS], settings, backends=app[keys.BACKENDS], metrics=app[keys.METRICS])
    app[keys.REGISTRY] = reg
    app[keys.METRICS].watch_engines(reg.load_reports)
    watchdog = asyncio.create_task(reg.watchdog()) if settings.idle_timeout else None
    preload = asyncio.create_task(_preload(reg, settings.preload_models))
    yield
    for task in (watchdog, preload):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await reg.close()


async def _drain(app: web.Application) -> None:
    """SIGTERM: the listener is closed and readiness says 503 at once; requests in flight (streams too)
    get ``--shutdown-grace`` seconds to finish, which aiohttp waits for after this."""
    app[keys.DRAINING].set()
    log.info("draining: not accepting new connections; in-flight requests have %g s to finish",
             app[keys.SETTINGS].shutdown_grace)


async def _preload(reg: ModelRegistry, names: tuple[str, ...]) -> None:
    for name in names:
        try:
            await reg.load(name)
        except Exception as exc:  # reported; the server keeps serving the others
            log.error("preloading model %s failed: %s", name, getattr(exc, "message", exc))


def create_app(settings: ServerSettings, *, model_configs: Mapping[str, ModelConfig] | None = None,
               backends: Mapping[str, Backend] | None = None) -> web.Application:
    """Build the server. ``model_configs`` and ``backends`` default to the models directory and the
    built-in engines; tests pass their own."""
    check_api_keys((*settings.api_keys, *settings.admin_api_keys))
    _check_config_dir(Path(settings.config_dir))
    if model_configs is None:
        model_configs, problems = load_model_configs(settings.models_path)
        for problem in problems:
            log.warning("%s", problem)
    known = set(model_configs) | {alias for cfg in model_configs.values() for alias in cfg.aliases}
    unknown = [name for name in settings.preload_models if name not in known]
    if unknown:
        raise ConfigError(f"--preload-models names no configured model: {', '.join(unknown)} "
                          f"(configured: {', '.join(sorted(model_configs)) or 'none'})")
    app = web.Application(
        client_max_size=settings.upload_limit_bytes,
        middlewares=[request_log_middleware, error_middleware, access_middleware, body_middleware],
    )
    app[keys.SETTINGS] = settings
    app[keys.ACCESS] = AccessPolicy.from_settings(settings)
    if app[keys.ACCESS].listens_everywhere and not app[keys.ACCESS].keyed and not settings.allowed_hosts:
        log.warning("listening on every interface without API keys: only requests for localhost and loopback "
                    "addresses are answered; list the names clients use with --allowed-hosts, or set API keys")
    app[keys.MODEL_CONFIGS] = dict(model_configs)
    app[keys.METRICS] = Metrics()
    app[keys.BATCHERS] = {}
    app[keys.BACKENDS] = dict(default_backends() if backends is None else backends)
    app[keys.DRAINING] = asyncio.Event()
    app[keys.REPLICA_ID] = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
    app.on_shutdown.append(_drain)
    app.cleanup_ctx.append(_executor_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(retention_ctx)  # sweeps what is older than its age, in the background
    app.cleanup_ctx.append(_registry_ctx)
    app.cleanup_ctx.append(live_reload_ctx)
    app.cleanup_ctx.append(ui.assets_ctx)
    app.cleanup_ctx.append(gallery_installs.installs_ctx)  # ends before the registry: stops installs
    app.cleanup_ctx.append(responses.background_ctx)  # ends first: background responses still use the rest
    for module in API_MODULES:
        app.router.add_routes(module.routes)
    setup_aiohttp_apispec(
        app, title="localai_aio API", version=__version__, url="/swagger.json", swagger_path="/swagger/",
        static_path="/swagger/static", in_place=True,
        openapi_version="3.0.3", components=openapi.COMPONENTS, security=[{"BearerAuth": []}],
    )
    openapi.describe_models(app)
    if settings.cross_origins:
        cors = aiohttp_cors.setup(app, defaults={
            origin: aiohttp_cors.ResourceOptions(allow_credentials=False, expose_headers="*",
                                                 allow_headers="*", allow_methods="*")
            for origin in settings.cross_origins
        })
        for route in list(app.router.routes()):
            with contextlib.suppress(ValueError):  # static routes and duplicates
                cors.add(route)
    return app
