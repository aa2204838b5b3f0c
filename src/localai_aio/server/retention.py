"""What the server keeps expires: generated images after ``--generated-max-age``, and with
``--retention-days`` also stored responses and uploaded files (and images sooner, when that is shorter).

Why it works this way:
- One background task per process (``retention_ctx``) sweeps every few minutes (sooner for short ages);
  requests never wait for it: every deletion runs in the thread pool, in batches of ``BATCH`` so that one
  sweep of a large backlog does not hold the pool's threads or the database for long.
- Records are found by their ``created_at`` and deleted through the store's own delete methods, so a file's
  bytes leave the blob store after its row, as when a client deletes it; a background response still
  running is never swept. Images are blobs without records: they go by the blob's age.
- Replicas sharing a database may sweep at the same moment: what another replica deleted first is skipped.
- Storage out of reach ends the sweep for this round; the next round tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from localai_aio.config import ServerSettings
from localai_aio.runtime import run_blocking
from localai_aio.server import keys
from localai_aio.store.base import Store, StoreNotFound, StoreUnavailable
from localai_aio.store.blobs import BlobUnavailable
from localai_aio.store.generated_images import remove_old_images

log = logging.getLogger(__name__)

#: Records of each kind deleted per call in the thread pool.
BATCH = 100
#: The longest wait between two sweeps, in seconds.
MAX_INTERVAL = 300.0


@dataclass(frozen=True)
class Swept:
    responses: int = 0
    files: int = 0
    images: int = 0


def image_max_age(settings: ServerSettings) -> float:
    """Seconds a generated image is kept: ``--generated-max-age``, or the retention when that is shorter."""
    if settings.retention_days:
        return min(settings.generated_max_age, settings.retention_seconds)
    return settings.generated_max_age


def interval(settings: ServerSettings) -> float:
    """Seconds between sweeps: a quarter of the shortest age kept, from 1 s up to ``MAX_INTERVAL``."""
    return max(1.0, min(image_max_age(settings) / 4, MAX_INTERVAL))


def delete_batch(store: Store, before: float, limit: int = BATCH) -> tuple[int, int]:
    """Delete up to ``limit`` responses and ``limit`` files created before ``before``; returns how many of
    each were found (deleted here or, just before, by another replica)."""
    responses = store.response_ids_before(before, limit)
    for response_id in responses:
        with contextlib.suppress(StoreNotFound):
            store.delete_response(response_id)
    files = store.file_ids_before(before, limit)
    for file_id in files:
        with contextlib.suppress(StoreNotFound):
            store.delete_file(file_id)
    return len(responses), len(files)


async def sweep(app: web.Application, now: float | None = None) -> Swept:
    """One sweep of everything older than its age (``now``: the clock, for tests)."""
    settings, executor = app[keys.SETTINGS], app[keys.EXECUTOR]
    now = time.time() if now is None else now
    images = await run_blocking(executor, remove_old_images, app[keys.BLOBS], image_max_age(settings), now)
    responses = files = 0
    if settings.retention_days:
        before = now - settings.retention_seconds
        while True:
            batch = await run_blocking(executor, delete_batch, app[keys.STORE], before)
            responses, files = responses + batch[0], files + batch[1]
            if max(batch) < BATCH:
                break
    swept = Swept(responses, files, images)
    if swept != Swept():
        log.info("retention: removed %d stored response(s), %d file(s) and %d generated image(s)",
                 swept.responses, swept.files, swept.images)
    return swept


async def _loop(app: web.Application) -> None:
    pause = interval(app[keys.SETTINGS])
    while True:
        await asyncio.sleep(pause)
        try:
            await sweep(app)
        except (StoreUnavailable, BlobUnavailable) as exc:  # tried again next round
            log.warning("retention sweep stopped, storage is unavailable: %s", exc)
        except Exception:  # noqa: BLE001 - logged; the sweeps go on (one failed round must not end them)
            log.exception("retention sweep failed; trying again next round")


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_loop(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
