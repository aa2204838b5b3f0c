"""LocalAI's gallery API: ``POST /models/apply`` installs a gallery entry in the background and answers at
once with a job, ``GET /models/jobs/{uuid}`` reports its progress, ``GET /models/jobs`` lists the jobs and
``GET /models/available`` the gallery's entries.

Why it works this way:
- An install is the CLI's (``gallery.install.install``, as ``models install`` runs it): the same fetches,
  checksums and all-or-nothing rename, from the same gallery (``LOCALAI_GALLERY``, else ``conf/gallery.yaml``
  or the package's own), so a model installed from the web UI is exactly one installed from the shell.
- An install downloads and exports for minutes: it runs on a thread of its own, never on the event loop,
  one install at a time (a lock, taken in the order asked), and the request answers at once.
- Once the model's YAML is written, the models directory is read again (``server.live_reload.reload_models``,
  what SIGHUP and ``POST /models/reload`` do): the model is served at once, without a restart.
- An install never silently replaces a model the gallery did not install (a hand-written YAML, an export):
  that is a 409 before any job starts, unless the request says ``"overwrite": true``. The gallery marks
  the YAMLs it writes (``gallery.install.check_target``).
- Installing is an admin action: installs and their jobs are ``admin_only`` (user keys get 403; with only
  ``--api-keys`` every key is an admin), and ``--disable-gallery-api`` turns these routes off (403). The
  gallery's list (``/models/available``) is open to every key: it changes nothing.
- The install thread is a daemon: a server that stops mid-install does not wait for a download; the
  install is told to stop at its next step, and its temporary folder goes with it (nothing is served).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs

from localai_aio.api.common import public_base
from localai_aio.api.gallery_installs import (
    InstallFailed,
    Installs,
    check_install_target,
    enabled,
    install_entry,
    read_gallery,
)
from localai_aio.errors import InvalidRequest, NotFound
from localai_aio.gallery.install import (
    Gallery,
    GalleryEntry,
    is_installed,
)
from localai_aio.runtime import run_blocking
from localai_aio.server import keys
from localai_aio.server.access import admin_only
from localai_aio.server.middlewares import EXPECTS_JSON
from localai_aio.server.openapi import answers

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

#: LocalAI's other ways to name what to install; this server installs its own gallery's entries only.
UNSUPPORTED = ("url", "config_url", "overrides", "files")


@dataclass
class Job:
    id: str
    name: str
    steps: int  # the entry's files and post-processing steps: what progress counts
    processed: bool = False
    progress: float = 0.0
    message: str = "waiting for the install before it to finish"
    error: str | None = None

    def step(self, what: str, index: int) -> None:
        self.message = what
        self.progress = round(min(99.0, 100.0 * (index - 1) / max(1, self.steps)), 1)

    def finish(self, message: str, error: str | None = None) -> None:
        self.processed, self.progress, self.message, self.error = True, 100.0, message, error

    def status(self) -> dict[str, Any]:
        return {"uuid": self.id, "gallery_model_name": self.name, "processed": self.processed,
                "progress": self.progress, "message": self.message, "error": self.error, "deletion": False}


async def _run(app: web.Application, installs: Installs, job: Job, entry: GalleryEntry, overwrite: bool) -> None:
    counter = iter(range(1, 1 << 30))

    def step(what: str, counted: bool) -> None:
        if counted:
            job.step(what, next(counter))
        else:
            job.message = what
            job.progress = 99.0 if what.startswith("reading") else job.progress

    try:
        job.finish(await install_entry(app, installs, entry, overwrite, step))
    except InstallFailed as exc:
        job.finish("failed", str(exc))
    log.info("gallery job %s (%s): %s", job.id, entry.name, job.error or job.message)


@routes.post("/models/apply")
@admin_only
async def apply(request: web.Request) -> web.Response:
    """Install a gallery entry in the background: ``{"id": "<entry>"}`` (or LocalAI's ``gallery@entry``, or
    ``{"name": ...}``) answers ``{"uuid", "status": "<URL of GET /models/jobs/{uuid}>"}`` at once; 409 when
    a model of that name that the gallery did not install is there, unless ``"overwrite": true``.

    Not in /swagger.json: a document cannot say which ids the gallery has without naming real entries,
    and then every client generated from it (and the fuzzing tests) would start real downloads.
    """
    installs = enabled(request)
    body = request[keys.BODY]  # body_middleware has read it and checked it is a JSON object (EXPECTS_JSON)
    for key in UNSUPPORTED:
        if body.get(key) not in (None, "", [], {}):
            raise InvalidRequest(f"'{key}' is not supported: name an entry of this server's gallery with 'id' "
                                 "(GET /models/available lists them)", param=key)
    wanted = body.get("id") or body.get("name")
    if wanted is not None and not isinstance(wanted, str):
        raise InvalidRequest("'id' must be a string: the gallery entry to install", param="id")
    if not wanted or not wanted.strip():
        raise InvalidRequest("'id' is required: the gallery entry to install (GET /models/available lists "
                             "them)", param="id")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise InvalidRequest("'overwrite' must be a boolean: true replaces a model of the same name that the "
                             "gallery did not install", param="overwrite")
    name = wanted.strip().rpartition("@")[2]  # LocalAI's ids are gallery@name
    entry = (await read_gallery(request)).entries.get(name)
    if entry is None:
        raise NotFound(f"'{name}' is not in the gallery (GET /models/available lists its entries)", param="id")
    await check_install_target(request, entry, overwrite)  # said now, not in a job; the install checks again
    job = Job(str(uuid.uuid4()), entry.name, steps=len(entry.files) + len(entry.post))
    installs.add(job)
    task = asyncio.ensure_future(_run(request.app, installs, job, entry, overwrite))
    installs.tasks.add(task)
    task.add_done_callback(installs.tasks.discard)
    return web.json_response({"uuid": job.id, "status": f"{public_base(request)}/models/jobs/{job.id}"})


setattr(apply, EXPECTS_JSON, True)


@routes.get("/models/jobs/{uuid}")
@admin_only
@docs(tags=["models"], summary="An install job's progress: `processed`, `progress` (0-100), `message`, `error`.",
      responses=answers())
async def job_status(request: web.Request) -> web.Response:
    job = enabled(request).jobs.get(request.match_info["uuid"])
    if job is None:
        raise NotFound(f"No install job {request.match_info['uuid']!r}", param="uuid")
    return web.json_response(job.status())


@routes.get("/models/jobs")
@admin_only
@docs(tags=["models"], summary="Every install job this server has run, by uuid.", responses=answers())
async def jobs(request: web.Request) -> web.Response:
    return web.json_response({key: job.status() for key, job in enabled(request).jobs.items()})


def _entry_row(entry: GalleryEntry, gallery: Gallery, models: Path) -> dict[str, Any]:
    config = entry.config
    return {"name": entry.name, "id": entry.name, "description": entry.description, "license": entry.license,
            "size": entry.size, "backend": config.get("backend"), "usecases": list(config.get("known_usecases") or ()),
            "aliases": list(config.get("aliases") or ()), "default": entry.name in gallery.defaults,
            "installed": is_installed(models, entry)}


@routes.get("/models/available")
@docs(tags=["models"], summary="The gallery's entries (LocalAI's route), with whether each is installed.",
      responses=answers())
async def available(request: web.Request) -> web.Response:
    enabled(request)
    gallery = await read_gallery(request)
    models = Path(request.app[keys.SETTINGS].models_path)

    def rows() -> list[dict[str, Any]]:
        return [_entry_row(entry, gallery, models) for _, entry in sorted(gallery.entries.items())]

    return web.json_response(await run_blocking(request.app[keys.EXECUTOR], rows))
