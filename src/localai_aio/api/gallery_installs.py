"""Installing gallery entries from the server, as every protocol shares it: LocalAI's ``/models/apply``
jobs and Ollama's ``/api/pull`` run the same install (``gallery.install.install``, the CLI's), one at a time
(a lock, taken in the order asked) on a thread of its own, then read the models directory again so the
model is served at once. The routes are ``api.localai.gallery_jobs``' and ``api.ollama``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from localai_aio.config import conf_file
from localai_aio.errors import APIError, Conflict, InternalError, InvalidRequest
from localai_aio.gallery.install import (
    Gallery,
    GalleryEntry,
    InstallError,
    NotFromGallery,
    check_target,
    install,
    load_gallery,
)
from localai_aio.runtime import EngineThread, run_blocking
from localai_aio.server import keys
from localai_aio.server.live_reload import reload_models

log = logging.getLogger(__name__)

#: Finished jobs kept for ``GET /models/jobs``; the oldest finished ones go first.
KEPT_JOBS = 100


class GalleryDisabled(APIError):
    status = 403
    type = "permission_error"
    code = "gallery_api_disabled"


class InstallStopped(Exception):
    """Raised inside the install thread at its next step once the server is stopping."""


class InstallFailed(Exception):
    """An install that did not end with the model served; the message says why."""


@dataclass
class Installs:
    """The app's install jobs, the lock that runs installs one at a time and the thread they run on."""

    thread: EngineThread
    jobs: dict[str, Any] = field(default_factory=dict)  # LocalAI's jobs, by id (``processed`` once done)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    stopping: threading.Event = field(default_factory=threading.Event)

    def add(self, job: Any) -> None:
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


def enabled(request: web.Request) -> Installs:
    if request.app[keys.SETTINGS].disable_gallery_api:
        raise GalleryDisabled("The gallery API is turned off on this server (--disable-gallery-api); install "
                              "models with `localai-aio models install NAME` where the server runs")
    return request.app[keys.GALLERY_INSTALLS]


async def read_gallery(request: web.Request) -> Gallery:
    try:
        return await run_blocking(request.app[keys.EXECUTOR], load_gallery, gallery_path())
    except InstallError as exc:
        log.error("%s", exc)
        raise InternalError("The model gallery cannot be read; the server log says why") from None


async def check_install_target(request: web.Request, entry: GalleryEntry, overwrite: bool) -> None:
    models = Path(request.app[keys.SETTINGS].models_path)
    try:
        await run_blocking(request.app[keys.EXECUTOR], check_target, entry, models, overwrite=overwrite)
    except NotFromGallery as exc:
        raise Conflict(f"{exc}; send \"overwrite\": true to replace it", param="overwrite") from None
    except InstallError as exc:  # a name that cannot be a model's (".", a path)
        raise InvalidRequest(str(exc), param="id") from None


async def install_entry(app: web.Application, installs: Installs, entry: GalleryEntry, overwrite: bool,
                        step: Callable[[str, bool], None]) -> str:
    """Install ``entry`` once the installs before it are done, and serve it; what was done, or
    ``InstallFailed``. ``step(what, counted)`` hears of each step on the event loop: counted ones are the
    install's own (a file fetched, an export), the others say what the server does around them."""
    loop = asyncio.get_running_loop()

    def report(what: str) -> None:  # on the install thread, as each step starts
        if installs.stopping.is_set():
            raise InstallStopped
        loop.call_soon_threadsafe(step, what, True)

    async with installs.lock:
        step("starting", False)
        log.info("installing %s from the gallery", entry.name)
        models = Path(app[keys.SETTINGS].models_path)
        try:
            fresh = await run_blocking(installs.thread, install, entry, models, overwrite=overwrite, report=report)
        except InstallError as exc:
            raise InstallFailed(f"install of {entry.name} failed: {exc} (nothing was written)") from None
        except InstallStopped:
            raise InstallFailed("the server stopped during the install (nothing was written)") from None
        except Exception as exc:  # noqa: BLE001 - the caller reports it; the server carries on
            log.exception("install of %s failed", entry.name)
            raise InstallFailed(f"install of {entry.name} failed: {type(exc).__name__}: {exc}") from None
        step("reading the models directory again", False)
        _, problems = await reload_models(app, f"install of {entry.name}")
        if entry.name not in app[keys.REGISTRY].names():
            raise InstallFailed(f"{entry.name} was installed but is not served: "
                                + ("; ".join(problems) or "its YAML was not found"))
        return f"{entry.name} {'installed' if fresh else 'was already installed'}; it is served now"
