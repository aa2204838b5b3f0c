"""SQLite store under the config dir: WAL journal, ``synchronous=FULL``, one writer at a time.

Why these settings: a write the API acknowledged must survive ``kill -9`` and a power cut, and a
write cut short must never corrupt the database. WAL with FULL sync gives both; every change is one
transaction. Uploaded bytes live in ``files/`` under server-made names (``file-<hex>``), written to a
staging name, fsynced and renamed before their row is committed, so a row never points at a partial
file; at start, staged files and stored files that no row points to (a crash between the rename and
the COMMIT, or between a delete's COMMIT and the unlink) are swept, and rows without their bytes are
reported.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from localai_aio.store.base import Page, StoreNotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS assistants (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    history TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS response_items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (response_id, id)
);
CREATE TABLE IF NOT EXISTS assistant_files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    assistant_id TEXT NOT NULL REFERENCES assistants(id) ON DELETE CASCADE,
    file_id TEXT NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    UNIQUE (assistant_id, file_id)
);
"""

ASSISTANT_FIELDS = ("name", "description", "model", "instructions", "tools", "metadata")


log = logging.getLogger(__name__)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class SQLiteStore:
    def __init__(self, config_dir: str | Path):
        self.root = Path(config_dir)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "localai.db", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._sweep()
        self._fail_interrupted()

    def _sweep(self) -> None:
        for stale in self.files_dir.glob(".upload-*"):
            stale.unlink(missing_ok=True)
        known = {row["id"] for row in self._query("SELECT id FROM files")}
        orphans = [path for path in self.files_dir.glob("file-*") if path.name not in known]
        for path in orphans:
            path.unlink(missing_ok=True)
        if orphans:
            log.warning("removed %d stored file(s) that no record points to (left by a crash)", len(orphans))
        missing = sorted(file_id for file_id in known if not (self.files_dir / file_id).is_file())
        if missing:
            log.error("%d file record(s) have no stored bytes: %s", len(missing), ", ".join(missing[:10]))

    def _fail_interrupted(self) -> None:
        """Background responses the last run left unfinished will never finish: say so."""
        with self._tx() as db:
            rows = db.execute("SELECT id, body FROM responses WHERE status IN ('queued', 'in_progress')").fetchall()
            for row in rows:
                body = json.loads(row["body"])
                body.update(status="failed", error={"code": "server_error",
                                                    "message": "The server restarted before the response finished"})
                db.execute("UPDATE responses SET status = 'failed', body = ? WHERE id = ?",
                           (json.dumps(body), row["id"]))
        if rows:
            log.warning("%d background response(s) interrupted by a restart are marked failed", len(rows))

    # -- helpers --------------------------------------------------------------------------------------------

    def _tx(self):  # noqa: ANN202
        """One transaction under the writer lock (BEGIN IMMEDIATE: no deadlocks between writers)."""
        store = self

        class Tx:
            def __enter__(self) -> sqlite3.Connection:
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self, kind, exc, tb) -> None:  # noqa: ANN001
                try:
                    store._db.execute("ROLLBACK" if kind else "COMMIT")
                finally:
                    store._lock.release()

        return Tx()

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _page(self, table: str, where: str, args: tuple, *, limit: int, order: str, after: str | None,
              before: str | None, id_column: str = "id") -> tuple[list[sqlite3.Row], bool]:
        clauses, params = [where], list(args)
        for cursor, op in ((after, ">" if order == "asc" else "<"), (before, "<" if order == "asc" else ">")):
            if cursor is not None:
                clauses.append(f"seq {op} COALESCE((SELECT seq FROM {table} WHERE {id_column} = ? AND {where}), "
                               f"{'-1' if op == '>' else '9223372036854775807'})")
                params += [cursor, *args]
        direction = "ASC" if order == "asc" else "DESC"
        if before is not None:  # walk backwards from the cursor, then restore the requested order
            direction = "DESC" if order == "asc" else "ASC"
        sql = f"SELECT * FROM {table} WHERE {' AND '.join(clauses)} ORDER BY seq {direction} LIMIT ?"
        rows = self._query(sql, (*params, limit + 1))
        has_more = len(rows) > limit
        rows = rows[:limit]
        if before is not None:
            rows.reverse()
        return rows, has_more

    def _assistant(self, row: sqlite3.Row) -> dict[str, Any]:
        body = json.loads(row["body"])
        file_ids = [r["file_id"] for r in self._query(
            "SELECT file_id FROM assistant_files WHERE assistant_id = ? ORDER BY seq", (row["id"],))]
        return {"id": row["id"], "object": "assistant", "created_at": row["created_at"],
                **{k: body.get(k) for k in ASSISTANT_FIELDS}, "file_ids": file_ids}

    @staticmethod
    def _file(row: sqlite3.Row) -> dict[str, Any]:
        return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
                "filename": row["filename"], "purpose": row["purpose"], "status": "processed"}

    @staticmethod
    def _link(row: sqlite3.Row) -> dict[str, Any]:
        return {"id": row["file_id"], "object": "assistant.file", "created_at": row["created_at"],
                "assistant_id": row["assistant_id"]}

    def _require(self, db: sqlite3.Connection, table: str, object_id: str, kind: str) -> None:
        if db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (object_id,)).fetchone() is None:
            raise StoreNotFound(kind, object_id)

    # -- responses ------------------------------------------------------------------------------------------

    def save_response(self, response: dict[str, Any], history: list[dict[str, Any]] | None = None,
                      input_items: list[dict[str, Any]] | None = None) -> None:
        """Insert a response with its input items, or update its body (and ``history`` when given)."""
        with self._tx() as db:
            row = db.execute("SELECT history FROM responses WHERE id = ?", (response["id"],)).fetchone()
            kept = json.dumps(history) if history is not None else (row["history"] if row else "[]")
            if row is None:
                db.execute("INSERT INTO responses (id, created_at, status, body, history) VALUES (?, ?, ?, ?, ?)",
                           (response["id"], int(response["created_at"]), response["status"], json.dumps(response),
                            kept))
                for item in input_items or []:
                    db.execute("INSERT INTO response_items (response_id, id, body) VALUES (?, ?, ?)",
                               (response["id"], item["id"], json.dumps(item)))
            else:
                db.execute("UPDATE responses SET status = ?, body = ?, history = ? WHERE id = ?",
                           (response["status"], json.dumps(response), kept, response["id"]))

    def get_response(self, response_id: str) -> dict[str, Any]:
        rows = self._query("SELECT body FROM responses WHERE id = ?", (response_id,))
        if not rows:
            raise StoreNotFound("response", response_id)
        return json.loads(rows[0]["body"])

    def response_history(self, response_id: str) -> list[dict[str, Any]]:
        """The conversation up to and including the response: what ``previous_response_id`` continues."""
        rows = self._query("SELECT history FROM responses WHERE id = ?", (response_id,))
        if not rows:
            raise StoreNotFound("response", response_id)
        return json.loads(rows[0]["history"])

    def list_input_items(self, response_id: str, *, limit: int, order: str, after: str | None,
                         before: str | None) -> Page:
        self.get_response(response_id)
        rows, more = self._page("response_items", "response_id = ?", (response_id,), limit=limit, order=order,
                                after=after, before=before)
        return Page([json.loads(r["body"]) for r in rows], more)

    def delete_response(self, response_id: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount == 0:
                raise StoreNotFound("response", response_id)

    # -- assistants -----------------------------------------------------------------------------------------

    def create_assistant(self, fields: dict[str, Any]) -> dict[str, Any]:
        assistant_id = _new_id("asst_")
        body = {k: fields.get(k) for k in ASSISTANT_FIELDS}
        body["tools"] = body["tools"] or []
        body["metadata"] = body["metadata"] or {}
        with self._tx() as db:
            for file_id in fields.get("file_ids") or []:
                self._require(db, "files", file_id, "file")
            now = int(time.time())
            db.execute("INSERT INTO assistants (id, created_at, body) VALUES (?, ?, ?)",
                       (assistant_id, now, json.dumps(body)))
            for file_id in dict.fromkeys(fields.get("file_ids") or []):
                db.execute("INSERT INTO assistant_files (assistant_id, file_id, created_at) VALUES (?, ?, ?)",
                           (assistant_id, file_id, now))
        return self.get_assistant(assistant_id)

    def get_assistant(self, assistant_id: str) -> dict[str, Any]:
        rows = self._query("SELECT * FROM assistants WHERE id = ?", (assistant_id,))
        if not rows:
            raise StoreNotFound("assistant", assistant_id)
        return self._assistant(rows[0])

    def list_assistants(self, *, limit: int, order: str, after: str | None, before: str | None) -> Page:
        rows, more = self._page("assistants", "1 = 1", (), limit=limit, order=order, after=after, before=before)
        return Page([self._assistant(r) for r in rows], more)

    def update_assistant(self, assistant_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        with self._tx() as db:
            row = db.execute("SELECT body FROM assistants WHERE id = ?", (assistant_id,)).fetchone()
            if row is None:
                raise StoreNotFound("assistant", assistant_id)
            body = json.loads(row["body"])
            body.update({k: v for k, v in fields.items() if k in ASSISTANT_FIELDS})
            db.execute("UPDATE assistants SET body = ? WHERE id = ?", (json.dumps(body), assistant_id))
            if "file_ids" in fields:
                for file_id in fields["file_ids"] or []:
                    self._require(db, "files", file_id, "file")
                db.execute("DELETE FROM assistant_files WHERE assistant_id = ?", (assistant_id,))
                now = int(time.time())
                for file_id in dict.fromkeys(fields["file_ids"] or []):
                    db.execute("INSERT INTO assistant_files (assistant_id, file_id, created_at) VALUES (?, ?, ?)",
                               (assistant_id, file_id, now))
        return self.get_assistant(assistant_id)

    def delete_assistant(self, assistant_id: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM assistants WHERE id = ?", (assistant_id,)).rowcount == 0:
                raise StoreNotFound("assistant", assistant_id)

    # -- links ----------------------------------------------------------------------------------------------

    def attach_file(self, assistant_id: str, file_id: str) -> dict[str, Any]:
        with self._tx() as db:
            self._require(db, "assistants", assistant_id, "assistant")
            self._require(db, "files", file_id, "file")
            db.execute("INSERT OR IGNORE INTO assistant_files (assistant_id, file_id, created_at) VALUES (?, ?, ?)",
                       (assistant_id, file_id, int(time.time())))
        return self.get_assistant_file(assistant_id, file_id)

    def get_assistant_file(self, assistant_id: str, file_id: str) -> dict[str, Any]:
        self.get_assistant(assistant_id)
        rows = self._query("SELECT * FROM assistant_files WHERE assistant_id = ? AND file_id = ?",
                           (assistant_id, file_id))
        if not rows:
            raise StoreNotFound("file", file_id)
        return self._link(rows[0])

    def list_assistant_files(self, assistant_id: str, *, limit: int, order: str, after: str | None,
                             before: str | None) -> Page:
        self.get_assistant(assistant_id)
        rows, more = self._page("assistant_files", "assistant_id = ?", (assistant_id,), limit=limit, order=order,
                                after=after, before=before, id_column="file_id")
        return Page([self._link(r) for r in rows], more)

    def detach_file(self, assistant_id: str, file_id: str) -> None:
        with self._tx() as db:
            self._require(db, "assistants", assistant_id, "assistant")
            if db.execute("DELETE FROM assistant_files WHERE assistant_id = ? AND file_id = ?",
                          (assistant_id, file_id)).rowcount == 0:
                raise StoreNotFound("file", file_id)

    # -- files ----------------------------------------------------------------------------------------------

    def staging_path(self) -> Path:
        return self.files_dir / f".upload-{secrets.token_hex(12)}"

    def create_file(self, staged: Path, *, filename: str, purpose: str) -> dict[str, Any]:
        file_id = _new_id("file-")
        final = self.files_dir / file_id
        with staged.open("rb") as f:
            os.fsync(f.fileno())
        size = staged.stat().st_size
        os.replace(staged, final)
        _fsync_dir(self.files_dir)
        try:
            with self._tx() as db:
                db.execute("INSERT INTO files (id, created_at, bytes, filename, purpose) VALUES (?, ?, ?, ?, ?)",
                           (file_id, int(time.time()), size, filename, purpose))
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return self.get_file(file_id)

    def get_file(self, file_id: str) -> dict[str, Any]:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        if not rows:
            raise StoreNotFound("file", file_id)
        return self._file(rows[0])

    def list_files(self, *, purpose: str | None, limit: int, order: str, after: str | None,
                   before: str | None) -> Page:
        where, args = ("purpose = ?", (purpose,)) if purpose is not None else ("1 = 1", ())
        rows, more = self._page("files", where, args, limit=limit, order=order, after=after, before=before)
        return Page([self._file(r) for r in rows], more)

    def file_path(self, file_id: str) -> Path:
        self.get_file(file_id)
        return self.files_dir / file_id

    def delete_file(self, file_id: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount == 0:
                raise StoreNotFound("file", file_id)
        (self.files_dir / file_id).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
