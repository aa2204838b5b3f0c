"""POST /v1/tokenize and /v1/detokenize for GGUF models, in the shapes LocalAI's, vLLM's and llama.cpp's
clients read (llama.cpp's paths, /tokenize and /detokenize, answer too).

The text is tokenized on the model's own thread with its own tokenizer, exactly as prompts are, so the
ids are the ones a prompt would use. ``content`` (llama.cpp, LocalAI) and ``prompt`` (vLLM) both name
the text; ``add_special`` (llama.cpp, default false) and ``add_special_tokens`` (vLLM, default true) both
ask for the BOS token, each with its own API's default.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from localai_aio.api.common import json_route, resolve_model
from localai_aio.errors import InvalidRequest
from localai_aio.server import keys
from localai_aio.server.schemas import definition_schema

routes = web.RouteTableDef()


def _tokenize(engine: Any, text: str, add_bos: bool, with_pieces: bool) -> dict[str, Any]:
    ids = engine.tokenize(text, add_bos=add_bos, special=True)
    tokens = [{"id": token, "piece": engine.token_bytes(token).decode("utf-8", "replace")} for token in ids] \
        if with_pieces else ids
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.n_ctx}


def _detokenize(engine: Any, tokens: list[int]) -> str:
    bad = next((token for token in tokens if not 0 <= token < engine.n_vocab), None)
    if bad is not None:  # llama.cpp aborts the whole process on an id outside its vocabulary
        raise InvalidRequest(f"Token id {bad} is outside the model's vocabulary of {engine.n_vocab}",
                             param="tokens")
    return b"".join(engine.token_bytes(token) for token in tokens).decode("utf-8", "replace")


@routes.post("/v1/tokenize")
@routes.post("/tokenize")
@json_route("post", None, "tokens", schema=definition_schema("localai.TokenizeRequest"), use_case="completion",
            summary="Tokenize text with a GGUF model's own tokenizer.")
async def tokenize(request: web.Request) -> web.Response:
    body = request[keys.BODY]
    text = body.get("content", body.get("prompt"))
    if text is None:
        raise InvalidRequest("'content' (or 'prompt') is required", param="content")
    add_bos = body["add_special"] if "add_special" in body else body.get("add_special_tokens", "prompt" in body)
    cfg = resolve_model(request, body.get("model"), "completion")
    return web.json_response(await request.app[keys.REGISTRY].read(
        cfg.name, _tokenize, text, bool(add_bos), bool(body.get("with_pieces"))))


@routes.post("/v1/detokenize")
@routes.post("/detokenize")
@json_route("post", None, "tokens", schema=definition_schema("localai.DetokenizeRequest"), use_case="completion",
            summary="Turn token ids back into text.")
async def detokenize(request: web.Request) -> web.Response:
    body = request[keys.BODY]
    cfg = resolve_model(request, body.get("model"), "completion")
    text = await request.app[keys.REGISTRY].read(cfg.name, _detokenize, body["tokens"])
    return web.json_response({"content": text, "prompt": text})
