"""Where assistants, files and stored responses are kept: SQLite (one process) or PostgreSQL (replicas)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localai_aio.store.base import Store
    from localai_aio.store.blobs import BlobStore


def open_store(database_url: str, config_dir: str | Path, blobs: BlobStore) -> Store:
    """PostgreSQL for a ``database_url`` (``--database-url``), else SQLite in the config dir."""
    if database_url:
        from localai_aio.store.postgres import PostgresStore

        return PostgresStore(database_url, blobs)
    from localai_aio.store.sqlite import SQLiteStore

    return SQLiteStore(config_dir, blobs)
