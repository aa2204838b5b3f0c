"""Liveness, readiness and Prometheus metrics (an admin key's route: they describe every user's traffic)."""

from __future__ import annotations

from aiohttp import web
from aiohttp_apigami import docs
from prometheus_client import CONTENT_TYPE_LATEST

from localai_aio.server import keys
from localai_aio.server.access import admin_only

routes = web.RouteTableDef()


@routes.get("/healthz")
@docs(tags=["health"], summary="Liveness: the process answers.")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
@docs(tags=["health"], summary="Readiness: configuration loaded and preloaded models ready; 503 while "
                               "draining after SIGTERM.")
async def readyz(request: web.Request) -> web.Response:
    if request.app[keys.DRAINING].is_set():
        return web.json_response({"status": "draining"}, status=503)
    reg = request.app[keys.REGISTRY]
    pending = [name for name in request.app[keys.SETTINGS].preload_models if not reg.is_loaded(name)]
    failed = {name: error for name in pending if (error := reg.load_error(name))}
    if failed:
        return web.json_response({"status": "failed", "failed": failed,
                                  "pending": [n for n in pending if n not in failed]}, status=503)
    if pending:
        return web.json_response({"status": "loading", "pending": pending}, status=503,
                                 headers={"Retry-After": "1"})
    return web.json_response({"status": "ready", "models": reg.names(), "loaded": reg.loaded_names()})


@routes.get("/metrics")
@admin_only
@docs(tags=["health"], summary="Prometheus metrics.")
async def metrics(request: web.Request) -> web.Response:
    body = request.app[keys.METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
