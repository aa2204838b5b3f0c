"""POST /v1/images/generations and the generated images it links to (GET /generated-images/<id>.png).

Images are kept in the blob store (``generated-images/<name>``: under ``--config-dir`` unless
``--blob-url`` says otherwise), so that every replica serves the images any of them made; names are
made by the server (32 hex digits) and images are removed once older than ``--generated-max-age`` (or
``--retention-days``, when shorter) by the retention sweep (``server.retention``); the blob store's side of
them is ``store.generated_images``.
Generation runs off the event loop and stops between denoising steps when the client leaves.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs

from localai_aio.api.common import json_route, now, public_base, resolve_model, storage_call
from localai_aio.errors import InvalidRequest, NotFound
from localai_aio.runtime import CancelFlag
from localai_aio.server import keys
from localai_aio.server.openapi import answers
from localai_aio.store.blobs import BlobNotFound
from localai_aio.store.generated_images import PREFIX, save_image

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

IMAGE_NAME = re.compile(r"^[0-9a-f]{32}\.png$")
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MAX_IMAGES = 10
def _int(body: dict[str, Any], key: str, lo: int, hi: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise InvalidRequest(f"Invalid value for '{key}': must be an integer {bound}", param=key)
    return value


def parse_size(value: Any, default: str, limit: int) -> tuple[int, int]:
    text = value if value is not None else default
    match = SIZE.match(text) if isinstance(text, str) else None
    if not match:
        raise InvalidRequest("Invalid value for 'size': expected WIDTHxHEIGHT, e.g. 512x512", param="size")
    width, height = int(match.group(1)), int(match.group(2))
    if width % 8 or height % 8 or not 8 <= width <= limit or not 8 <= height <= limit:
        raise InvalidRequest(f"Invalid value for 'size': {text}; width and height must be multiples of 8 from 8 "
                             f"to {limit}", param="size")
    return width, height


@routes.post("/v1/images/generations")
@routes.post("/images/generations")
@json_route("post", "/v1/images/generations", "images", use_case="image", responses=answers())
async def generate_images(request: web.Request) -> web.Response:
    body = request[keys.BODY]
    cfg = resolve_model(request, body.get("model"), "image")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("'prompt' is required and must be a non-empty string", param="prompt")
    negative = body.get("negative_prompt")
    n = _int(body, "n", 1, MAX_IMAGES) or 1
    steps = _int(body, "step", 1, 150)
    seed = _int(body, "seed", 0, 2**63 - 1)
    clip_skip = _int(body, "clip_skip", 0, 12)
    _int(body, "mode", 0, None)  # LocalAI's image mode: accepted; text-to-image is the only mode here
    response_format = body.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise InvalidRequest("Invalid value for 'response_format': must be 'url' or 'b64_json'",
                             param="response_format")
    settings = request.app[keys.SETTINGS]
    default_size = str(cfg.option("size") or "512x512")
    width, height = parse_size(body.get("size"), default_size, settings.image_max_size)
    started = time.perf_counter()
    async with request.app[keys.REGISTRY].acquire(cfg.name) as handle:
        try:
            pngs = await handle.run(handle.engine.generate, prompt=prompt, negative_prompt=negative, n=n,
                                    width=width, height=height, steps=steps, seed=seed, clip_skip=clip_skip,
                                    cancel=CancelFlag())
        except asyncio.CancelledError:
            log.info("client left; image generation on %s stopped", cfg.name)
            raise
        finally:
            request.app[keys.METRICS].inference.labels(cfg.name, "image").observe(time.perf_counter() - started)
    if response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
    else:
        names = [await storage_call(request.app, save_image, request.app[keys.BLOBS], png) for png in pngs]
        base = public_base(request)
        data = [{"url": f"{base}/generated-images/{name}"} for name in names]
    return web.json_response({"created": now(), "data": data})


@routes.get("/generated-images/{name}")
@docs(tags=["images"], summary="A generated image (PNG), as linked from /v1/images/generations.",
      responses=answers(content_type="image/png"))
async def generated_image(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    try:
        if not IMAGE_NAME.match(name):
            raise BlobNotFound(name)
        path = await storage_call(request.app, request.app[keys.BLOBS].fetch, PREFIX + name)
    except BlobNotFound:
        raise NotFound(f"No generated image named '{name}'") from None
    return web.FileResponse(path, headers={"Content-Type": "image/png"})
