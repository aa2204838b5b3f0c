"""Generated images in the blob store, under ``generated-images/<32 hex digits>.png``: saved by the
images route, served back by name, and removed by the retention sweep once old. Every replica shares
the blob store, so every replica serves the images any of them made."""

from __future__ import annotations

import secrets
import time

from localai_aio.store.blobs import BlobStore

PREFIX = "generated-images/"  # the images' keys in the blob store


def save_image(blobs: BlobStore, data: bytes) -> str:
    name = secrets.token_hex(16) + ".png"
    staged = blobs.staging_path()
    try:
        staged.write_bytes(data)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    blobs.put(PREFIX + name, staged)
    return name


def remove_old_images(blobs: BlobStore, max_age: float, now_: float | None = None) -> int:
    """Delete generated images older than ``max_age`` seconds; returns how many. Every replica may run
    this at once: deleting what another has just deleted is fine."""
    cutoff = (now_ or time.time()) - max_age
    old = [info.key for info in blobs.list(PREFIX) if info.modified < cutoff]
    for key in old:
        blobs.delete(key)
    return len(old)
