"""Every ``web.AppKey`` of the application, in one place (no module-level state elsewhere)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    pass

SETTINGS = web.AppKey("settings", "ServerSettings")
MODEL_CONFIGS = web.AppKey("model_configs", "dict[str, ModelConfig]")
REGISTRY = web.AppKey("registry", "ModelRegistry")
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
METRICS = web.AppKey("metrics", "Metrics")
BACKENDS = web.AppKey("backends", dict)
REQUEST_ID = web.RequestKey("request_id", str)
BODY = web.RequestKey("body", dict)  # the JSON body, validated by its route's schema (middlewares.body_middleware)
PRINCIPAL = web.RequestKey("principal", "Principal")  # who asked (principal.Principal), set by the access middleware
ACCESS = web.AppKey("access", "AccessPolicy")  # Host, Origin and keys (access.AccessPolicy)
STORE = web.AppKey("store", "Store")
BATCHERS = web.AppKey("batchers", dict)
BACKGROUND = web.AppKey("background_responses", dict)  # response id -> api.openai.responses.Running
RELOAD_LOCK = web.AppKey("reload_lock", asyncio.Lock)  # model reloads run one at a time (live_reload)
DRAINING = web.AppKey("draining", asyncio.Event)  # set on SIGTERM: not ready, finishing what it has
UI_ASSETS = web.AppKey("ui_assets", "UIAssets")  # the web UI's files, read once at start (api.localai.ui)
GALLERY_INSTALLS = web.AppKey("gallery_installs", "Installs")  # POST /models/apply jobs (api.localai.gallery_jobs)
BLOBS = web.AppKey("blobs", "BlobStore")  # uploaded files and generated images (store.blobs)
REPLICA_ID = web.AppKey("replica_id", str)  # this process, as owner of background responses
