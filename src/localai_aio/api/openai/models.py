"""GET /v1/models (every configured model and alias, in OpenAI's list shape), GET /v1/models/{id}, and
POST /models/reload (read the models directory again: an admin key's route, like LocalAI's /models/*)."""

from __future__ import annotations

from aiohttp import web
from aiohttp_apigami import docs

from localai_aio.api.common import registry
from localai_aio.server.access import admin_only
from localai_aio.server.live_reload import reload_models
from localai_aio.server.openapi import answers

routes = web.RouteTableDef()


def _model_entry(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "localai-aio"}


@routes.get("/v1/models")
@routes.get("/models")
@docs(tags=["models"], summary="List the configured models (and their aliases).", responses=answers("ModelList"))
async def list_models(request: web.Request) -> web.Response:
    reg = registry(request)
    data = [_model_entry(name, reg.config(name).created) for name in reg.names()]
    data += [_model_entry(alias, reg.config(target).created) for alias, target in reg.aliases().items()]
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model_id}")
@routes.get("/models/{model_id}")
@docs(tags=["models"], summary="Retrieve a model (an alias answers with the model it names as `root`).",
      responses=answers("Model"))
async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model_id"]
    cfg = registry(request).config(name)  # 404 model_not_found for a name nothing configures
    return web.json_response({**_model_entry(name, cfg.created), "root": cfg.name})


@routes.post("/models/reload")
@admin_only
@docs(tags=["models"], summary="Read the models directory again: new, changed and removed YAMLs take effect; "
                               "requests in flight finish on the config they started with.",
      responses=answers("Reloaded"))
async def reload(request: web.Request) -> web.Response:
    done, problems = await reload_models(request.app, "POST /models/reload")
    return web.json_response({"added": list(done.added), "changed": list(done.changed),
                              "removed": list(done.removed), "problems": problems})
