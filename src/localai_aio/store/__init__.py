"""Where assistants, files and stored responses are kept: SQLite (one process) or PostgreSQL (replicas)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localai_aio.config import ServerSettings
    from localai_aio.store.base import Store
    from localai_aio.store.blobs import BlobStore


def open_store(settings: ServerSettings, blobs: BlobStore) -> Store:
    """The store the settings name: PostgreSQL for ``--database-url``, else SQLite in the config dir."""
    if settings.database_url:
        from localai_aio.store.postgres import PostgresStore

        return PostgresStore(settings.database_url, blobs)
    from localai_aio.store.sqlite import SQLiteStore

    return SQLiteStore(settings.config_dir, blobs)
