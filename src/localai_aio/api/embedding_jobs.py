"""Embeddings as every protocol shares them: inputs checked once, vectors made in merged batches per model
(``embedding_batches.MicroBatcher``), so concurrent requests of OpenAI's and Ollama's routes share one
engine call. The routes are ``api.openai.embeddings``' and ``api.ollama``'s."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from aiohttp import web

from localai_aio.api.embedding_batches import MicroBatcher
from localai_aio.backends.families import EmbeddingEngine
from localai_aio.errors import APIError, InvalidRequest
from localai_aio.server import keys

Item = tuple[str, Any]  # ("text", str) | ("tokens", list[int])


def parse_inputs(value: Any, limit: int) -> list[Item]:
    def is_tokens(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str):
        items: list[Item] = [("text", value)]
    elif is_tokens(value) and value:
        items = [("tokens", value)]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        items = [("text", v) for v in value]
    elif isinstance(value, list) and value and all(is_tokens(v) for v in value):
        items = [("tokens", v) for v in value]
    else:
        raise InvalidRequest("Invalid value for 'input': must be a string, a list of strings, a list of token ids "
                             "or a list of token-id lists (non-empty)", param="input")
    if len(items) > limit:
        raise InvalidRequest(f"Too many inputs: {len(items)}; at most {limit} per request", param="input")
    for i, (_, data) in enumerate(items):
        if not data:
            raise InvalidRequest(f"Input {i} is empty; empty strings and token lists cannot be embedded",
                                 param="input")
    return items



def embed_items(engine: EmbeddingEngine, items: list[Item]) -> list[tuple[np.ndarray, int] | APIError]:
    """Runs in a worker: one engine call for the whole merged batch; bad items fail alone."""
    results: list[tuple[np.ndarray, int] | APIError | None] = [None] * len(items)
    texts = [i for i, (kind, _) in enumerate(items) if kind == "text"]
    tokens: dict[int, list[int]] = dict(zip(texts, engine.embedding_tokens([items[i][1] for i in texts]),
                                            strict=True))
    for i, (kind, data) in enumerate(items):
        if kind == "tokens":
            bad = [t for t in data if not 0 <= t < engine.vocab_size]
            if bad:
                results[i] = InvalidRequest(f"Token id {bad[0]} is outside the model's vocabulary of "
                                            f"{engine.vocab_size}", param="input")
                continue
            tokens[i] = list(data)[: engine.max_length]
    good = sorted(tokens)
    vectors = engine.embed([tokens[i] for i in good]) if good else np.zeros((0, 0), np.float32)
    for row, i in enumerate(good):
        results[i] = (vectors[row], len(tokens[i]))
    return results  # type: ignore[return-value]


def batcher_for(request: web.Request, model: str) -> MicroBatcher:
    app = request.app
    batchers = app[keys.BATCHERS]
    if model not in batchers:
        settings = app[keys.SETTINGS]

        async def run(items: list[Item]) -> list[Any]:
            started = time.perf_counter()
            results = await app[keys.REGISTRY].call(model, embed_items, items)
            app[keys.METRICS].inference.labels(model, "embeddings").observe(time.perf_counter() - started)
            return results

        parallel = app[keys.REGISTRY].parallel(model)
        batchers[model] = MicroBatcher(run, window=settings.batch_window_ms / 1000, max_size=settings.max_batch_size,
                                       concurrency=parallel,
                                       max_pending=settings.max_batch_size * (parallel + settings.queue_size))
    return batchers[model]
