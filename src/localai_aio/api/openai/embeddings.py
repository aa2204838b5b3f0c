"""POST /v1/embeddings (and /embeddings): vectors in input order, merged across concurrent requests.

Token ids are read in the model's own vocabulary, or in OpenAI's ``cl100k_base`` when the request names
an OpenAI embedding model (``cl100k``). Documented behaviour for awkward input: an empty string,
more than ``--embeddings-max-inputs`` inputs, or a token id outside the vocabulary get 400 naming the
input; text longer than the model takes is truncated at its maximum length (``usage`` counts the tokens
really used).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from localai_aio.api.common import json_route, resolve_model
from localai_aio.api.embedding_jobs import Item, batcher_for, parse_inputs
from localai_aio.api.openai.cl100k import cl100k_texts, means_cl100k
from localai_aio.errors import APIError, InvalidRequest
from localai_aio.runtime import run_blocking
from localai_aio.server import keys
from localai_aio.server.openapi import answers

routes = web.RouteTableDef()

def _as_text(items: list[Item]) -> list[Item]:
    """Token ids sent for an OpenAI embedding model, read as the cl100k_base text they encode."""
    texts = iter(cl100k_texts([data for kind, data in items if kind == "tokens"]))
    return [("text", next(texts)) if kind == "tokens" else (kind, data) for kind, data in items]


def _shape(vector: np.ndarray, dimensions: int | None, encoding: str) -> Any:
    if dimensions is not None:
        vector = vector[:dimensions]
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    vector = np.ascontiguousarray(vector, dtype="<f4")
    if encoding == "base64":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    return vector


def _render(results: list[tuple[np.ndarray, int]], dimensions: int | None, encoding: str, model: str) -> bytes:
    """The response body, built and encoded in a worker: 2,048 vectors as JSON floats take a third of a
    second, which the event loop (and every stream on it) must not spend. orjson writes numpy arrays
    directly, float32 values in their shortest exact form."""
    data = [{"object": "embedding", "index": i, "embedding": _shape(vector, dimensions, encoding)}
            for i, (vector, _) in enumerate(results)]
    tokens = sum(count for _, count in results)
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)


@routes.post("/v1/embeddings")
@routes.post("/embeddings")
@json_route("post", "/v1/embeddings", "embeddings", use_case="embeddings", responses=answers("Embeddings"))
async def embeddings(request: web.Request) -> web.Response:
    body = request[keys.BODY]
    cfg = resolve_model(request, body.get("model"), "embeddings")
    items = parse_inputs(body.get("input"), request.app[keys.SETTINGS].embeddings_max_inputs)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequest("Invalid value for 'encoding_format': must be 'float' or 'base64'",
                             param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise InvalidRequest("Invalid value for 'dimensions': must be a positive integer", param="dimensions")
    if means_cl100k(body.get("model")) and any(kind == "tokens" for kind, _ in items):
        items = await run_blocking(request.app[keys.EXECUTOR], _as_text, items)
    results = await batcher_for(request, cfg.name).submit(items)
    for result in results:
        if isinstance(result, APIError):
            raise result
    if dimensions is not None and dimensions > len(results[0][0]):
        raise InvalidRequest(f"Invalid value for 'dimensions': this model makes {len(results[0][0])}-dimensional "
                             "vectors", param="dimensions")
    payload = await run_blocking(request.app[keys.EXECUTOR], _render, results, dimensions, encoding,
                                 body.get("model") or cfg.name)
    return web.Response(body=payload, content_type="application/json")
