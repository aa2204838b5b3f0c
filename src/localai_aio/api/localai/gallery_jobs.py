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
import contextlib
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs

from localai_aio.api.common import public_base
from localai_aio.config import conf_file
from localai_aio.errors import APIError, Conflict, InternalError, InvalidRequest, NotFound
from localai_aio.gallery.install import (
    Gallery,
    GalleryEntry,
    InstallError,
    NotFromGallery,
    check_target,
    install,
    is_installed,
    load_gallery,
)
from localai_aio.runtime import EngineThread, run_blocking
from localai_aio.server import keys
from localai_aio.server.access import admin_only
from localai_aio.server.live_reload import reload_models
from localai_aio.server.middlewares import EXPECTS_JSON
from localai_aio.server.openapi import answers

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

#: Finished jobs kept for ``GET /models/jobs``; the oldest finished ones go first.
KEPT_JOBS = 100
#: LocalAI's other ways to name what to install; this server installs its own gallery's entries only.
UNSUPPORTED = ("url", "config_url", "overrides", "files")


class GalleryDisabled(APIError):
    status = 403
    type = "permission_error"
    code = "gallery_api_disabled"


class InstallStopped(Exception):
    """Raised inside the install thread at its next step once the server is stopping."""


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


@dataclass
class Installs:
    """The app's install jobs, the lock that runs them one at a time and the thread they run on."""

    thread: EngineThread
    jobs: dict[str, Job] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    stopping: threading.Event = field(default_factory=threading.Event)

    def add(self, job: Job) -> None:
        finished = [key for key, old in self.jobs.items() if old.processed]
        for key in finished[:max(0, len(self.jobs) + 1 - KEPT_JOBS)]:
            del self.jobs[key]
        self.jobs[job.id] = job


async def installs_ctx(app: web.Application) -> AsyncIterator[None]:
    installs = Installs(EngineThread("localai-gallery-install"))
    app[keys.GALLERY_INSTALLS] = installs
    yield
    installs.stopping.set()
    for task in list(installs.tasks):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    installs.thread.shutdown(wait=False)


def gallery_path() -> Path:
    """The gallery ``models install`` reads: ``LOCALAI_GALLERY``, else ``conf/gallery.yaml`` (see ``conf_file``)."""
    return Path(os.environ.get("LOCALAI_GALLERY") or conf_file("gallery.yaml"))


def _enabled(request: web.Request) -> Installs:
    if request.app[keys.SETTINGS].disable_gallery_api:
        raise GalleryDisabled("The gallery API is turned off on this server (--disable-gallery-api); install "
                              "models with `localai-aio models install NAME` where the server runs")
    return request.app[keys.GALLERY_INSTALLS]


async def _gallery(request: web.Request) -> Gallery:
    try:
        return await run_blocking(request.app[keys.EXECUTOR], load_gallery, gallery_path())
    except InstallError as exc:
        log.error("%s", exc)
        raise InternalError("The model gallery cannot be read; the server log says why") from None


async def _run(app: web.Application, installs: Installs, job: Job, entry: GalleryEntry, overwrite: bool) -> None:
    loop = asyncio.get_running_loop()
    counter = iter(range(1, 1 << 30))

    def report(what: str) -> None:  # on the install thread, as each step starts
        if installs.stopping.is_set():
            raise InstallStopped
        loop.call_soon_threadsafe(job.step, what, next(counter))

    async with installs.lock:
        job.message = "starting"
        log.info("installing %s from the gallery (job %s)", entry.name, job.id)
        models = Path(app[keys.SETTINGS].models_path)
        try:
            fresh = await run_blocking(installs.thread, install, entry, models, overwrite=overwrite, report=report)
        except InstallError as exc:
            job.finish("failed", f"install of {entry.name} failed: {exc} (nothing was written)")
        except InstallStopped:
            job.finish("failed", "the server stopped during the install (nothing was written)")
        except Exception as exc:  # noqa: BLE001 - the job reports it; the server carries on
            log.exception("install of %s failed (job %s)", entry.name, job.id)
            job.finish("failed", f"install of {entry.name} failed: {type(exc).__name__}: {exc}")
        else:
            job.message, job.progress = "reading the models directory again", 99.0
            _, problems = await reload_models(app, f"install of {entry.name}")
            served = entry.name in app[keys.REGISTRY].names()
            if served:
                job.finish(f"{entry.name} {'installed' if fresh else 'was already installed'}; it is served now")
            else:
                job.finish("failed", f"{entry.name} was installed but is not served: "
                                     + ("; ".join(problems) or "its YAML was not found"))
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
    installs = _enabled(request)
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
    entry = (await _gallery(request)).entries.get(name)
    if entry is None:
        raise NotFound(f"'{name}' is not in the gallery (GET /models/available lists its entries)", param="id")
    await _check_target(request, entry, overwrite)  # said now, not in a job; the install checks again
    job = Job(str(uuid.uuid4()), entry.name, steps=len(entry.files) + len(entry.post))
    installs.add(job)
    task = asyncio.ensure_future(_run(request.app, installs, job, entry, overwrite))
    installs.tasks.add(task)
    task.add_done_callback(installs.tasks.discard)
    return web.json_response({"uuid": job.id, "status": f"{public_base(request)}/models/jobs/{job.id}"})


setattr(apply, EXPECTS_JSON, True)


async def _check_target(request: web.Request, entry: GalleryEntry, overwrite: bool) -> None:
    models = Path(request.app[keys.SETTINGS].models_path)
    try:
        await run_blocking(request.app[keys.EXECUTOR], check_target, entry, models, overwrite=overwrite)
    except NotFromGallery as exc:
        raise Conflict(f"{exc}; send \"overwrite\": true to replace it", param="overwrite") from None
    except InstallError as exc:  # a name that cannot be a model's (".", a path)
        raise InvalidRequest(str(exc), param="id") from None


@routes.get("/models/jobs/{uuid}")
@admin_only
@docs(tags=["models"], summary="An install job's progress: `processed`, `progress` (0-100), `message`, `error`.",
      responses=answers())
async def job_status(request: web.Request) -> web.Response:
    job = _enabled(request).jobs.get(request.match_info["uuid"])
    if job is None:
        raise NotFound(f"No install job {request.match_info['uuid']!r}", param="uuid")
    return web.json_response(job.status())


@routes.get("/models/jobs")
@admin_only
@docs(tags=["models"], summary="Every install job this server has run, by uuid.", responses=answers())
async def jobs(request: web.Request) -> web.Response:
    return web.json_response({key: job.status() for key, job in _enabled(request).jobs.items()})


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
    _enabled(request)
    gallery = await _gallery(request)
    models = Path(request.app[keys.SETTINGS].models_path)

    def rows() -> list[dict[str, Any]]:
        return [_entry_row(entry, gallery, models) for _, entry in sorted(gallery.entries.items())]

    return web.json_response(await run_blocking(request.app[keys.EXECUTOR], rows))
