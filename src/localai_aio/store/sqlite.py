"""SQLite store under the config dir: WAL journal, ``synchronous=FULL``, one writer at a time.

Why these settings: a write the API acknowledged must survive ``kill -9`` and a power cut, and a
write cut short must never corrupt the database. WAL with FULL sync gives both; every change is one
transaction. One process owns the file, so at start every background response still unfinished was
cut short by the last run and is marked failed, and every stored file no record points to is swept.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from localai_aio.store import migrate
from localai_aio.store.blobs import BlobStore, LocalBlobs
from localai_aio.store.sql import SQLStore


class SQLiteStore(SQLStore):
    def __init__(self, config_dir: str | Path, blobs: BlobStore | None = None, *,
                 target_version: int | None = None):
        self.root = Path(config_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        super().__init__(blobs if blobs is not None else LocalBlobs(self.root))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "localai.db", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate(target_version)
        if target_version is None:
            self.sweep_blobs()
            self._fail_unfinished("1 = 1", (), "The server restarted before the response finished")

    def _migrate(self, target: int | None) -> None:
        with self._lock:
            self._db.execute(migrate.TABLE)
            applied = [row[0] for row in self._db.execute("SELECT version FROM schema_migrations")]
            for migration in migrate.pending("sqlite", applied, target):
                sql, args = migrate.record(migration, "?")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(migration.sql):
                        self._db.execute(statement)
                    self._db.execute(sql, args)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the writer lock (BEGIN IMMEDIATE: no deadlocks between writers)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration script, one by one (``executescript`` would COMMIT on its own)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        if not statement and line.lstrip().startswith("--"):
            continue
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement.strip()
            statement = ""
    if statement.strip():
        yield statement.strip()

