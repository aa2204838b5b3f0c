"""POST /v1/rerank (and /rerank): documents ordered by their relevance to a query, in Jina's and Cohere's shape.

The body is LocalAI's (Jina's) ``JINARerankRequest``: ``model``, ``query``, ``documents`` (strings, or objects
with a ``text`` as Cohere's clients send them), ``top_n`` (at least 1; more than there are documents means
all of them) and ``return_documents`` (default true). The answer lists ``{"index", "relevance_score",
"document": {"text"}}`` by falling score (equal scores keep the documents' order), cut to ``top_n``, with
``usage`` counting the tokens of every pair as the model saw them (truncation included), as embeddings do.

An engine that reranks has ``rerank(query, documents) -> [(relevance in [0, 1], tokens)]`` in document order
(``onnx-rerank``, and ``llama-cpp`` with rank pooling). A request is one call on the engine's own thread:
it is already a batch of pairs for one query, which the engine runs batched itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from localai_aio.api.common import json_route, resolve_model
from localai_aio.errors import InvalidRequest, NotImplementedForModel
from localai_aio.server import keys
from localai_aio.server.openapi import answers
from localai_aio.server.schemas import definition_schema

routes = web.RouteTableDef()

Ranked = tuple[float, int]  # (relevance in [0, 1], tokens the pair took)


def parse_documents(value: Any, limit: int) -> list[str]:
    """The documents' texts: each a string or an object with a string ``text`` (other keys are the
    client's own, as Cohere allows)."""
    if not isinstance(value, list) or not value:
        raise InvalidRequest("Invalid value for 'documents': must be a non-empty list of strings or of "
                             "objects with a `text`", param="documents")
    if len(value) > limit:
        raise InvalidRequest(f"Too many documents: {len(value)}; at most {limit} per request", param="documents")
    texts = []
    for i, item in enumerate(value):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise InvalidRequest(f"Invalid value for 'documents.{i}': must be a string or an object with a "
                                 "string `text`", param=f"documents.{i}")
        texts.append(text)
    return texts


def parse_top_n(value: Any, count: int) -> int:
    if value is None:
        return count
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest("Invalid value for 'top_n': must be an integer of at least 1", param="top_n")
    return min(value, count)


def _score(engine: Any, name: str, query: str, documents: list[str]) -> list[Ranked]:
    """Runs on the engine's thread."""
    rerank = getattr(engine, "rerank", None)
    if rerank is None:
        raise NotImplementedForModel(f"Model '{name}' does not rerank documents", param="model")
    return rerank(query, documents)


def render(ranked: Sequence[Ranked], documents: Sequence[str], *, top_n: int, with_documents: bool,
           model: str) -> dict[str, Any]:
    order = sorted(range(len(ranked)), key=lambda i: -ranked[i][0])[:top_n]  # stable: ties keep their order
    results = [{"index": i, "relevance_score": ranked[i][0], **({"document": {"text": documents[i]}}
                                                                   if with_documents else {})} for i in order]
    tokens = sum(count for _, count in ranked)
    return {"model": model, "results": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@routes.post("/v1/rerank")
@routes.post("/rerank")
@json_route("post", None, "rerank", schema=definition_schema("schema.JINARerankRequest"), use_case="rerank",
            summary="Order documents by their relevance to a query (Jina's and Cohere's rerank API).",
            responses=answers("Rerank"))
async def rerank(request: web.Request) -> web.Response:
    body = request[keys.BODY]
    cfg = resolve_model(request, body.get("model"), "rerank")
    documents = parse_documents(body.get("documents"), request.app[keys.SETTINGS].embeddings_max_inputs)
    top_n = parse_top_n(body.get("top_n"), len(documents))
    started = time.perf_counter()
    ranked = await request.app[keys.REGISTRY].call(cfg.name, _score, cfg.name, body["query"], documents)
    request.app[keys.METRICS].inference.labels(cfg.name, "rerank").observe(time.perf_counter() - started)
    return web.json_response(render(ranked, documents, top_n=top_n, model=body.get("model") or cfg.name,
                                    with_documents=body.get("return_documents", True)))
