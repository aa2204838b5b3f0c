"""PostgreSQL store, shared by every replica: psycopg 3 with a connection pool.

Why this shape: the store's methods are blocking and run in the thread pool, so the synchronous
psycopg pool fits them without a second event loop. Migrations run at start under an advisory lock,
so replicas starting together apply each one once. A database that cannot be reached (restarting,
network down) raises ``StoreUnavailable``, which the API answers with 503 and ``Retry-After``; the
pool checks each connection before lending it, so the replicas recover by themselves when the
database returns. Unlike SQLite, another replica may be running a background response right now, so
only responses whose lease ran out are failed at start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from localai_aio.store import migrate
from localai_aio.store.base import StoreUnavailable
from localai_aio.store.blobs import STAGING_GRACE, BlobStore
from localai_aio.store.sql import SQLStore

log = logging.getLogger(__name__)

#: pg_advisory_lock key held while migrating ("localai" in ASCII)
MIGRATION_LOCK = 0x6C6F63616C6169
#: seconds a request waits for a connection before the store counts as unavailable
CONNECT_TIMEOUT = 3.0
#: stored or staged bytes younger than this may belong to an upload another replica is still handling
ORPHAN_GRACE = STAGING_GRACE


class _Cursor:
    """The queries are written with SQLite's ``?``; psycopg's placeholder is ``%s``."""

    def __init__(self, cursor: Any):
        self._cursor = cursor

    def execute(self, sql: str, args: tuple = ()) -> Any:
        return self._cursor.execute(sql.replace("?", "%s"), args)


class PostgresStore(SQLStore):
    FOR_UPDATE = " FOR UPDATE"
    NOW = "extract(epoch from clock_timestamp())::double precision"

    def __init__(self, url: str, blobs: BlobStore, *, pool_size: int = 8, target_version: int | None = None,
                 start_timeout: float = 30.0):
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError:
            raise RuntimeError("--database-url needs psycopg: pip install 'localai-aio[postgres]'") from None
        super().__init__(blobs)
        self._unavailable = (psycopg.OperationalError, PoolTimeout)
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=CONNECT_TIMEOUT, open=False,
                                    check=ConnectionPool.check_connection, name="localai-store",
                                    kwargs={"row_factory": dict_row, "autocommit": True,
                                            "connect_timeout": int(CONNECT_TIMEOUT)})
        try:
            self._pool.open(wait=True, timeout=start_timeout)
        except self._unavailable as exc:
            self._pool.close()
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {_safe(url)}: {exc}") from None
        try:
            self._migrate(target_version)
            if target_version is None:
                self.sweep_blobs(ORPHAN_GRACE)
                self.expire_leases()
        except BaseException:
            self._pool.close()
            raise

    def _migrate(self, target: int | None) -> None:
        with self._pool.connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            try:
                conn.execute(migrate.TABLE)
                applied = [row["version"] for row in conn.execute("SELECT version FROM schema_migrations")]
                for migration in migrate.pending("postgres", applied, target):
                    sql, args = migrate.record(migration, "%s")
                    with conn.transaction():
                        conn.execute(migration.sql)
                        conn.execute(sql, args)
                    log.info("database migrated to version %d (%s)", migration.version, migration.name)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))

    @contextmanager
    def _tx(self) -> Iterator[_Cursor]:
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
                yield _Cursor(cursor)
        except self._unavailable as exc:
            raise StoreUnavailable(f"the database is unavailable: {exc}") from exc

    def _query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        try:
            with self._pool.connection() as conn:
                return conn.execute(sql.replace("?", "%s"), args).fetchall()
        except self._unavailable as exc:
            raise StoreUnavailable(f"the database is unavailable: {exc}") from exc

    def close(self) -> None:
        self._pool.close()


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    user, colon, _ = credentials.partition(":")
    if not at or not colon:
        return url
    return f"{scheme}://{user}:***@{host}"
