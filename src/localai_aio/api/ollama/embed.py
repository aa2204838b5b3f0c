"""Ollama's ``POST /api/embed`` (``input``: a string or a list; vectors L2-normalized, as Ollama's; with
``"truncate": false`` an input longer than the model takes is a 400 instead of being cut) and
the older ``POST /api/embeddings`` (one ``prompt``, the vector as the model makes it), on the same merged
batches as ``/v1/embeddings`` (``api.embedding_jobs``)."""

from __future__ import annotations

import numpy as np
from aiohttp import web

from localai_aio.api.common import json_route
from localai_aio.api.embedding_jobs import batcher_for, parse_inputs
from localai_aio.api.ollama.shared import Clock, after, model_config
from localai_aio.errors import APIError, InvalidRequest
from localai_aio.server import keys
from localai_aio.server.schemas import definition_schema

routes = web.RouteTableDef()


async def _vectors(request: web.Request, value: object, clock: Clock,
                   truncate: bool = True) -> tuple[list[np.ndarray], int]:
    body = request[keys.BODY]
    cfg = model_config(request, body["model"], "embeddings")
    items = parse_inputs(value, request.app[keys.SETTINGS].embeddings_max_inputs)
    await clock.load_model(request, cfg)
    clock.mark_prepared()
    results = await batcher_for(request, cfg.name).submit(items)
    clock.mark_end()
    for result in results:
        if isinstance(result, APIError):
            raise result
    if not truncate:  # an input cut to the model's maximum length has exactly that many tokens
        longest = await request.app[keys.REGISTRY].read(cfg.name, lambda engine: engine.max_length)
        if any(count >= longest for _, count in results):
            raise InvalidRequest(f"the input length exceeds the context length ({longest} tokens)", param="input")
    await after(request, cfg, body.get("keep_alive"))
    return [vector for vector, _ in results], sum(count for _, count in results)


@routes.post("/api/embed")
@json_route("post", None, "ollama", schema=definition_schema("ollama.EmbedRequest"), use_case="embeddings",
            summary="Embed a text or a list of texts (Ollama's API)")
async def embed(request: web.Request) -> web.Response:
    body = request[keys.BODY]
    clock = Clock()
    vectors, tokens = await _vectors(request, body["input"], clock, body.get("truncate") is not False)
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions > len(vectors[0]):
        raise InvalidRequest(f"invalid dimensions: this model makes {len(vectors[0])}-dimensional vectors",
                             param="dimensions")
    out = []
    for vector in vectors:
        vector = np.asarray(vector[:dimensions] if dimensions else vector, dtype=np.float32)
        out.append((vector / max(float(np.linalg.norm(vector)), 1e-12)).tolist())
    figures = clock.figures(tokens, 0)
    return web.json_response({"model": body["model"], "embeddings": out, "total_duration": figures["total_duration"],
                              "load_duration": figures["load_duration"], "prompt_eval_count": tokens})


@routes.post("/api/embeddings")
@json_route("post", None, "ollama", schema=definition_schema("ollama.EmbeddingsRequest"), use_case="embeddings",
            summary="Embed one text (Ollama's older route)")
async def embeddings(request: web.Request) -> web.Response:
    body = request[keys.BODY]
    if not body["prompt"]:
        return web.json_response({"embedding": []})
    vectors, _ = await _vectors(request, body["prompt"], Clock())
    return web.json_response({"embedding": np.asarray(vectors[0], dtype=np.float32).tolist()})
