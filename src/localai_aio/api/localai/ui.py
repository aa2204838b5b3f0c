"""The web UI: ``GET /`` (the single page), ``GET /ui/assets/{version}/...`` (its ES modules, styles and the
vendored libraries) and ``GET /ui/api/models`` (what the UI needs to know of each model beyond OpenAI's
``/v1/models`` shape, which must stay as it is for OpenAI's clients).

Why it is served this way:
- The files are package data (``localai_aio/web``) read once at start, off the event loop, and kept in
  memory with their gzip form: a request never touches the disk, and a path can only name a file that
  is there (nothing to traverse).
- Asset URLs carry a hash of all the files (``/ui/assets/<version>/js/app.js``). The modules import each
  other by relative paths, which keep that prefix, so every asset is cached for a year as immutable and a
  new package version is a new URL; ``/`` itself is revalidated on each load (``no-cache`` and an ETag).
- A Content-Security-Policy lets the page load scripts, styles, media and connections from this origin
  only: it cannot fetch anything from another host, and markup that got past the sanitiser cannot run
  inline script.
- The page and its assets are public (``server.middlewares.PUBLIC_PATHS``); the API behind them is not: the UI
  asks for a key when the API answers 401.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

from aiohttp import web
from aiohttp_apigami import docs

from localai_aio.api.common import registry
from localai_aio.errors import NotFound
from localai_aio.runtime import run_blocking
from localai_aio.server import keys
from localai_aio.server.openapi import answers

routes = web.RouteTableDef()

ASSETS_PREFIX = "/ui/assets"
#: What is served, by file suffix (anything else in the folder, such as licence texts and the vendor
#: manifest, stays in the package only).
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
#: Only this origin, for everything; ``data:``/``blob:`` for generated images and streamed audio.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes | None  # None where gzip would not help (images)
    content_type: str
    etag: str  # of the body; the gzip form's is this with "-gzip"


@dataclass(frozen=True)
class UIAssets:
    version: str
    index: Asset
    files: dict[str, Asset]  # by path below the web folder ("js/app.js")


def _asset(body: bytes, content_type: str) -> Asset:
    text = content_type.startswith(("text/", "image/svg"))
    return Asset(body, gzip.compress(body, 9, mtime=0) if text else None, content_type,
                 hashlib.sha256(body).hexdigest()[:20])


def _walk(folder: Traversable, prefix: str = "") -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for item in folder.iterdir():
        path = f"{prefix}{item.name}"
        if item.is_dir():
            found.update(_walk(item, path + "/"))
        elif any(item.name.endswith(suffix) for suffix in CONTENT_TYPES):
            found[path] = item.read_bytes()
    return found


def load_assets(root: Traversable | None = None) -> UIAssets:
    """Read the web folder (blocking: call it off the event loop)."""
    files = _walk(root or resources.files("localai_aio").joinpath("web"))
    page = files.pop("index.html")
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + files[path] + b"\0")
    digest.update(page)
    version = digest.hexdigest()[:12]
    index = page.replace(b"{{assets}}", f"{ASSETS_PREFIX}/{version}".encode())
    return UIAssets(version, _asset(index, CONTENT_TYPES[".html"]),
                    {path: _asset(body, CONTENT_TYPES["." + path.rpartition(".")[2]])
                     for path, body in files.items()})


async def assets_ctx(app: web.Application) -> AsyncIterator[None]:
    app[keys.UI_ASSETS] = await run_blocking(app[keys.EXECUTOR], load_assets)
    yield


def _accepts_gzip(request: web.Request) -> bool:
    for part in request.headers.get("Accept-Encoding", "").split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def _etag_matches(header: str, etag: str) -> bool:
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or f'"{etag}"' in tags


def _serve(request: web.Request, asset: Asset, cache_control: str, **extra: str) -> web.Response:
    compressed = asset.gzipped is not None and _accepts_gzip(request)
    etag = asset.etag + ("-gzip" if compressed else "")
    headers = {"Cache-Control": cache_control, "ETag": f'"{etag}"', "Vary": "Accept-Encoding",
               "X-Content-Type-Options": "nosniff", **extra}
    if _etag_matches(request.headers.get("If-None-Match", ""), etag):
        return web.Response(status=304, headers=headers)
    if compressed:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=asset.gzipped if compressed else asset.body,
                        headers={**headers, "Content-Type": asset.content_type})


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    assets = request.app[keys.UI_ASSETS]
    return _serve(request, assets.index, REVALIDATE, **{"Content-Security-Policy": CSP,
                                                         "Referrer-Policy": "no-referrer"})


@routes.get(ASSETS_PREFIX + "/{version}/{path:.+}")
async def asset(request: web.Request) -> web.Response:
    """An asset of this version is immutable; another version's URL (a tab opened before an upgrade) gets
    today's file, revalidated."""
    assets = request.app[keys.UI_ASSETS]
    found = assets.files.get(request.match_info["path"])
    if found is None:
        raise NotFound(f"No web UI file {request.match_info['path']!r}")
    current = request.match_info["version"] == assets.version
    return _serve(request, found, IMMUTABLE if current else REVALIDATE)


@routes.get("/ui/api/models")
@docs(tags=["models"], summary="The configured models as the web UI shows them: backend, use cases, aliases, "
                               "loaded or not, and whether the gallery API is on.", responses=answers())
async def ui_models(request: web.Request) -> web.Response:
    reg = registry(request)
    data = []
    for name in reg.names():
        cfg = reg.config(name)
        data.append({"name": name, "backend": reg.backend_name(cfg), "usecases": sorted(reg.usecases(cfg)),
                     "aliases": list(cfg.aliases), "loaded": reg.is_loaded(name),
                     "error": cfg.error or reg.load_error(name)})
    return web.json_response({"object": "list", "data": data,
                              "gallery_api": not request.app[keys.SETTINGS].disable_gallery_api})
