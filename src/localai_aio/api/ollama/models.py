"""Ollama's model routes: ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``, ``GET /api/version``,
``POST /api/pull`` (a gallery install) and ``DELETE /api/delete`` (both an admin's), and ``/api/create``,
``/api/copy``, ``/api/push``, which this server does not do (models come from the gallery or a YAML in the
models directory).

A model is listed under its name with the ``:latest`` tag (a name that has a tag keeps it), and every alias
too. ``details`` come from the GGUF header (architecture, size label, parameter count) and the file name
(quantization); ``digest`` identifies the model's file by path, size and time, it is not its hash.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs

from localai_aio.api.common import json_route, registry
from localai_aio.api.gallery_installs import (
    InstallFailed,
    check_install_target,
    enabled,
    install_entry,
    read_gallery,
)
from localai_aio.api.ollama.shared import iso, model_config, quantization, stream_lines, tagged
from localai_aio.config import ModelConfig
from localai_aio.errors import APIError, InternalError, InvalidRequest, NotFound
from localai_aio.gallery.install import remove
from localai_aio.runtime import run_blocking
from localai_aio.server import keys
from localai_aio.server.access import admin_only
from localai_aio.server.live_reload import reload_models
from localai_aio.server.middlewares import EXPECTS_JSON
from localai_aio.server.schemas import definition_schema
from localai_aio.text.reasoning import markers_for

routes = web.RouteTableDef()

#: The version of Ollama's API these routes follow (clients check it before using newer fields).
OLLAMA_VERSION = "0.12.6"
#: ``expires_at`` of a model nothing unloads for idleness (Ollama's for ``keep_alive: -1``).
NEVER = "2318-01-01T00:00:00Z"
#: This server's use cases as Ollama's capabilities.
CAPABILITIES = {"chat": "completion", "embeddings": "embedding"}


class NotSupported(APIError):
    status = 501
    code = "not_supported"


@functools.lru_cache(maxsize=64)
def _gguf_facts(path: str, _stamp: tuple[int, float]) -> dict[str, Any]:
    """What a GGUF's header says about it (cached per file version)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError):
        return {}

    def get(key: str) -> Any:
        field = reader.fields.get(key)
        try:
            return field.contents() if field is not None else None
        except (ValueError, IndexError, UnicodeDecodeError):
            return None

    arch = get("general.architecture") or ""
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    info = {"general.architecture": arch, "general.parameter_count": parameters}
    for key in ("general.name", "general.size_label", f"{arch}.context_length", f"{arch}.embedding_length",
                f"{arch}.block_count"):
        value = get(key)
        if value is not None:
            info[key] = value
    return {"model_info": info, "template": get("tokenizer.chat_template") or "", "family": arch,
            "parameters": parameters, "size_label": get("general.size_label") or ""}


def _files(cfg: ModelConfig) -> list[Path]:
    path = cfg.model_path
    if path is None or not path.exists():
        return []
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


def _parameter_size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def describe(cfg: ModelConfig, backend: str) -> dict[str, Any]:
    """A model's size, digest, time and details (reads files: on a worker thread)."""
    files = _files(cfg)
    size = sum(f.stat().st_size for f in files)
    mtime = max([f.stat().st_mtime for f in files] + [float(cfg.created)])
    gguf = cfg.model_path is not None and cfg.model_path.suffix == ".gguf" and files
    facts = _gguf_facts(str(cfg.model_path), (size, mtime)) if gguf else {}
    family = facts.get("family") or backend
    digest = hashlib.sha256(f"{cfg.name}|{cfg.model_path}|{size}|{mtime}".encode()).hexdigest()
    details = {"parent_model": "", "format": "gguf" if gguf else (backend or "").split("-")[0],
               "family": family, "families": [family] if family else None,
               "parameter_size": facts.get("size_label") or (_parameter_size(facts["parameters"]) if facts else ""),
               "quantization_level": quantization(cfg)}
    return {"size": size, "modified_at": iso(mtime), "digest": digest, "details": details, "facts": facts}


async def _describe(request: web.Request, cfg: ModelConfig) -> dict[str, Any]:
    return await run_blocking(request.app[keys.EXECUTOR], describe, cfg, registry(request).backend_name(cfg) or "")


def _listed(name: str, described: dict[str, Any]) -> dict[str, Any]:
    return {"name": tagged(name), "model": tagged(name), "modified_at": described["modified_at"],
            "size": described["size"], "digest": described["digest"], "details": described["details"]}


@routes.get("/api/tags")
@docs(tags=["ollama"], summary="The models (Ollama's API): every model and alias, tagged :latest")
async def tags(request: web.Request) -> web.Response:
    reg = registry(request)
    names = [(name, name) for name in reg.names()] + list(reg.aliases().items())
    out = []
    for shown, name in names:
        out.append(_listed(shown, await _describe(request, reg.config(name))))
    return web.json_response({"models": out})


def _parameters(cfg: ModelConfig) -> str:
    """The model's sampling defaults and stop words in a Modelfile's ``PARAMETER`` lines' form."""
    lines = [f"{key:<16}{value}" for key, value in cfg.parameters.items()
             if key != "model" and isinstance(value, str | int | float) and not isinstance(value, bool)]
    lines += [f"{'stop':<16}{json.dumps(word, ensure_ascii=False)}" for word in cfg.stopwords]
    return "\n".join(lines)


@routes.post("/api/show")
@json_route("post", None, "ollama", schema=definition_schema("ollama.ModelRequest"), use_case="chat",
            summary="A model's details, template, parameters and capabilities (Ollama's API)")
async def show(request: web.Request) -> web.Response:
    body = request[keys.BODY]
    cfg = model_config(request, body.get("model") or body.get("name"))
    described = await _describe(request, cfg)
    facts = described["facts"]
    uses = registry(request).usecases(cfg)
    capabilities = [CAPABILITIES[u] for u in CAPABILITIES if u in uses]
    template = facts.get("template", "")
    markers = markers_for(cfg.option("reasoning"))
    if "chat" in uses and markers is not None and markers.start in template:
        capabilities.append("thinking")
    if "chat" in uses and "tools" in template:
        capabilities.append("tools")
    parameters = _parameters(cfg)
    source = cfg.model_path.name if cfg.model_path else cfg.name  # the file's name: not where it is kept
    modelfile = "\n".join([f"# Modelfile of {cfg.name}, as this server serves it", f"FROM {source}",
                           *(f"PARAMETER {line}" for line in parameters.splitlines()),
                           *([f'SYSTEM """{cfg.system_prompt}"""'] if cfg.system_prompt else [])])
    return web.json_response({"modelfile": modelfile, "parameters": parameters, "template": template,
                              "details": described["details"], "model_info": facts.get("model_info", {}),
                              "capabilities": capabilities, "modified_at": described["modified_at"]})


@routes.get("/api/ps")
@docs(tags=["ollama"], summary="The loaded models (Ollama's API)")
async def ps(request: web.Request) -> web.Response:
    reg = registry(request)
    idle = request.app[keys.SETTINGS].idle_timeout
    expires = iso(time.time() + idle) if idle else NEVER
    out = []
    for name in reg.loaded_names():
        cfg = reg.config(name)
        described = await _describe(request, cfg)
        context = cfg.context_size or described["facts"].get("model_info", {}).get(
            f"{described['details']['family']}.context_length")
        out.append({**_listed(name, described), "expires_at": expires, "size_vram": 0,
                    **({"context_length": context} if context else {})})
    return web.json_response({"models": out})


@routes.get("/api/version")
@docs(tags=["ollama"], summary="The version of Ollama's API this server speaks")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION})


def _delete_files(cfg: ModelConfig, models: Path) -> None:
    """The model's YAML (or its bare file), and the folder the gallery installed it in."""
    source = cfg.source
    if source is None or models.resolve() not in source.resolve().parents:
        raise InvalidRequest(f"model \"{cfg.name}\" is not in the models directory, so it cannot be deleted here",
                             param="model")
    source.unlink(missing_ok=True)
    if source.suffix in (".yaml", ".yml") and (models / cfg.name).exists():
        remove(cfg.name, models)


@routes.delete("/api/delete")
@admin_only
async def delete(request: web.Request) -> web.Response:
    """Delete a model: its YAML (or bare file) and the folder the gallery installed it in.

    Not in /swagger.json, like ``/api/pull``: clients generated from it (and the fuzzing tests) would
    delete the models everything else is served by.
    """
    body = request[keys.BODY]
    cfg = model_config(request, body.get("model") or body.get("name"))
    models = Path(request.app[keys.SETTINGS].models_path)
    await run_blocking(request.app[keys.EXECUTOR], _delete_files, cfg, models)
    await reload_models(request.app, f"DELETE /api/delete {cfg.name}")
    return web.Response(status=200)


@routes.post("/api/pull")
@admin_only
async def pull(request: web.Request) -> web.StreamResponse:
    """Install a gallery entry: the same install as ``POST /models/apply`` (``api.gallery_installs``); the
    answer follows it: a status line as each step starts, ``{"status": "success"}`` once the model is
    served, or ``{"error": ...}``. A client that leaves does not stop the install.

    Not in /swagger.json, for the reason ``/models/apply`` is not: generated clients would start real
    downloads."""
    installs = enabled(request)
    body = request[keys.BODY]
    wanted = body.get("model") or body.get("name")
    if not wanted:
        raise InvalidRequest("model is required", param="model")
    name = wanted.removesuffix(":latest")
    entry = (await read_gallery(request)).entries.get(name)
    if entry is None:
        raise NotFound(f"pull model manifest: \"{wanted}\" is not in this server's gallery", param="model")
    await check_install_target(request, entry, overwrite=False)
    lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lines.put_nowait({"status": "pulling manifest"})
    task = asyncio.ensure_future(install_entry(request.app, installs, entry, False,
                                               lambda what, _counted: lines.put_nowait({"status": what})))
    installs.tasks.add(task)
    task.add_done_callback(installs.tasks.discard)

    async def statuses() -> AsyncIterator[dict[str, Any]]:
        while not task.done() or not lines.empty():
            waiter = asyncio.ensure_future(lines.get())
            await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
            if waiter.done():
                yield waiter.result()
            else:
                waiter.cancel()
        try:
            task.result()
        except InstallFailed as exc:
            raise InternalError(str(exc)) from None
        yield {"status": "success"}

    if body.get("stream", True) is not False:
        return await stream_lines(request, statuses(), f"a pull of {entry.name}")
    async for _ in statuses():
        pass
    return web.json_response({"status": "success"})


for _handler in (pull, delete):
    setattr(_handler, EXPECTS_JSON, definition_schema("ollama.ModelRequest")())  # the body is checked all the same
del _handler


async def _not_supported(request: web.Request) -> web.Response:
    what = request.path.rsplit("/", 1)[-1]
    raise NotSupported(f"/api/{what} is not supported by this server: models come from its gallery "
                       "(/api/pull) or a YAML in its models directory")


for _path in ("/api/create", "/api/copy", "/api/push"):
    routes.post(_path)(admin_only(_not_supported))
del _path
