"""The store's records and queries, written once for both databases.

SQLite and PostgreSQL differ here only in how a transaction is opened, in their placeholders (the
queries are written with ``?``; PostgreSQL's driver gets ``%s``) and in row locks (``FOR UPDATE``,
which SQLite does not need: it has one writer at a time). Each subclass provides ``_tx`` and
``_query``. Bytes go to the blob store before the row that points at them is committed, and leave
it after the row is gone, so a crash leaves at worst bytes without a row (swept at start), never a
row without bytes.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from localai_aio.principal import OPEN, Principal
from localai_aio.store.base import Page, StoreNotFound
from localai_aio.store.blobs import BlobNotFound, BlobStore

ASSISTANT_FIELDS = ("name", "description", "model", "instructions", "tools", "metadata")
UNFINISHED = ("queued", "in_progress")
FILES = "files/"

log = logging.getLogger("localai_aio.store")


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class SQLStore:
    #: appended to a SELECT whose row the transaction then updates
    FOR_UPDATE = ""
    #: the database's clock in Unix seconds: leases are timed by it, so replicas on machines whose clocks
    #: disagree still agree on when a lease ran out
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, blobs: BlobStore):
        self.blobs = blobs

    # -- what a database provides ---------------------------------------------------------------------------

    def _tx(self) -> AbstractContextManager[Any]:
        """One transaction; yields an object with ``execute(sql, args)`` returning a cursor."""
        raise NotImplementedError

    def _query(self, sql: str, args: tuple = ()) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- at start -------------------------------------------------------------------------------------------

    def sweep_blobs(self, grace: float = 0.0) -> tuple[int, list[str]]:
        """Remove stored bytes that no record points to (a crash between a blob's put and its row's
        COMMIT, or between a delete's COMMIT and the blob's removal) and report records without bytes.
        Bytes (and staged uploads) younger than ``grace`` seconds are left: another replica may be
        writing them, or about to commit their row. Returns (blobs removed, ids of records whose bytes are missing)."""
        self.blobs.sweep_staging(grace)
        known = {row["id"] for row in self._query("SELECT id FROM files")}  # before listing: see ``missing``
        stored = {info.key[len(FILES):]: info.modified for info in self.blobs.list(FILES)}
        cutoff = time.time() - grace
        orphans = [file_id for file_id, modified in stored.items() if file_id not in known and modified <= cutoff]
        for file_id in orphans:
            self.blobs.delete(FILES + file_id)
        if orphans:
            log.warning("removed %d stored file(s) that no record points to (left by a crash)", len(orphans))
        missing = sorted(known - set(stored))
        if missing:
            log.error("%d file record(s) have no stored bytes: %s", len(missing), ", ".join(missing[:10]))
        return len(orphans), missing

    # -- helpers --------------------------------------------------------------------------------------------

    def _page(self, table: str, where: str, args: tuple, *, limit: int, order: str, after: str | None,
              before: str | None, id_column: str = "id") -> tuple[list[Any], bool]:
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

    def _assistants(self, rows: list[Any]) -> list[dict[str, Any]]:
        """Assistants with their file ids, in one query for the whole page (not one per assistant)."""
        if not rows:
            return []
        links: dict[str, list[str]] = {row["id"]: [] for row in rows}
        marks = ", ".join("?" * len(links))
        for link in self._query(f"SELECT assistant_id, file_id FROM assistant_files WHERE assistant_id IN ({marks}) "
                                "ORDER BY seq", tuple(links)):
            links[link["assistant_id"]].append(link["file_id"])
        made = []
        for row in rows:
            body = json.loads(row["body"])
            made.append({"id": row["id"], "object": "assistant", "created_at": row["created_at"],
                         **{k: body.get(k) for k in ASSISTANT_FIELDS}, "file_ids": links[row["id"]]})
        return made

    @staticmethod
    def _file(row: Any) -> dict[str, Any]:
        return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
                "filename": row["filename"], "purpose": row["purpose"], "status": "processed"}

    @staticmethod
    def _link(row: Any) -> dict[str, Any]:
        return {"id": row["file_id"], "object": "assistant.file", "created_at": row["created_at"],
                "assistant_id": row["assistant_id"]}

    @staticmethod
    def _visible(who: Principal) -> tuple[str, tuple]:
        """The rows ``who`` may see, as a WHERE clause: all of them for an admin, else those its key made
        (rows made without a key, before keys were recorded or on a server without keys, have none)."""
        return ("1 = 1", ()) if who.admin else ("principal = ?", (who.hash,))

    def _require(self, db: Any, table: str, object_id: str, kind: str, who: Principal) -> None:
        visible, args = self._visible(who)
        if db.execute(f"SELECT 1 FROM {table} WHERE id = ? AND {visible}", (object_id, *args)).fetchone() is None:
            raise StoreNotFound(kind, object_id)

    def _get(self, table: str, columns: str, object_id: str, kind: str, who: Principal) -> Any:
        """The row ``object_id`` of ``table`` if ``who`` may see it."""
        visible, args = self._visible(who)
        rows = self._query(f"SELECT {columns} FROM {table} WHERE id = ? AND {visible}", (object_id, *args))
        if not rows:
            raise StoreNotFound(kind, object_id)
        return rows[0]

    def _delete(self, table: str, object_id: str, kind: str, who: Principal) -> None:
        visible, args = self._visible(who)
        with self._tx() as db:
            if db.execute(f"DELETE FROM {table} WHERE id = ? AND {visible}", (object_id, *args)).rowcount == 0:
                raise StoreNotFound(kind, object_id)

    def _link_files(self, db: Any, assistant_id: str, file_ids: list[str], who: Principal) -> None:
        """Link files ``who`` can see (a user cannot reach another's file through an assistant)."""
        for file_id in file_ids:
            self._require(db, "files", file_id, "file", who)
        now = int(time.time())
        for file_id in dict.fromkeys(file_ids):
            db.execute("INSERT INTO assistant_files (assistant_id, file_id, created_at) VALUES (?, ?, ?) "
                       "ON CONFLICT DO NOTHING", (assistant_id, file_id, now))

    # -- responses ------------------------------------------------------------------------------------------

    def save_response(self, response: dict[str, Any], history: list[dict[str, Any]] | None = None,
                      input_items: list[dict[str, Any]] | None = None, *, owner: str | None = None,
                      lease: float = 0.0, who: Principal = OPEN) -> None:
        """Insert a response (``who``'s) with its input items, or update its body (and ``history`` when
        given). A new background response is inserted already leased to ``owner``: no replica may take it
        for one whose owner died."""
        with self._tx() as db:
            row = db.execute(f"SELECT history FROM responses WHERE id = ?{self.FOR_UPDATE}",
                             (response["id"],)).fetchone()
            kept = json.dumps(history) if history is not None else (row["history"] if row else "[]")
            if row is None:
                lease_until = f"{self.NOW} + ?" if owner else "?"
                db.execute("INSERT INTO responses (id, created_at, status, body, history, owner, lease_until, "
                           f"principal) VALUES (?, ?, ?, ?, ?, ?, {lease_until}, ?)",
                           (response["id"], int(response["created_at"]), response["status"], json.dumps(response),
                            kept, owner, lease if owner else None, who.hash))
                for item in input_items or []:
                    db.execute("INSERT INTO response_items (response_id, id, body) VALUES (?, ?, ?)",
                               (response["id"], item["id"], json.dumps(item)))
            else:
                db.execute("UPDATE responses SET status = ?, body = ?, history = ? WHERE id = ?",
                           (response["status"], json.dumps(response), kept, response["id"]))

    def get_response(self, response_id: str, *, who: Principal = OPEN) -> dict[str, Any]:
        return json.loads(self._get("responses", "body", response_id, "response", who)["body"])

    def response_history(self, response_id: str, *, who: Principal = OPEN) -> list[dict[str, Any]]:
        """The conversation up to and including the response: what ``previous_response_id`` continues."""
        return json.loads(self._get("responses", "history", response_id, "response", who)["history"])

    def list_input_items(self, response_id: str, *, limit: int, order: str, after: str | None,
                         before: str | None, who: Principal = OPEN) -> Page:
        self.get_response(response_id, who=who)
        rows, more = self._page("response_items", "response_id = ?", (response_id,), limit=limit, order=order,
                                after=after, before=before)
        return Page([json.loads(r["body"]) for r in rows], more)

    def delete_response(self, response_id: str, *, who: Principal = OPEN) -> None:
        self._delete("responses", response_id, "response", who)

    # -- background responses' leases ----------------------------------------------------------------------

    def renew_leases(self, owner: str, lease: float) -> set[str]:
        with self._tx() as db:
            db.execute(f"UPDATE responses SET lease_until = {self.NOW} + ? WHERE owner = ? AND status IN (?, ?)",
                       (lease, owner, *UNFINISHED))
        rows = self._query("SELECT id FROM responses WHERE owner = ? AND cancel_requested AND status IN (?, ?)",
                           (owner, *UNFINISHED))
        return {row["id"] for row in rows}

    def expire_leases(self) -> list[str]:
        return self._fail_unfinished(f"lease_until IS NULL OR lease_until < {self.NOW}", (),
                                     "The server running the response stopped before it finished")

    def request_cancel(self, response_id: str, *, who: Principal = OPEN) -> None:
        visible, args = self._visible(who)
        with self._tx() as db:
            if db.execute(f"UPDATE responses SET cancel_requested = TRUE WHERE id = ? AND {visible}",
                          (response_id, *args)).rowcount == 0:
                raise StoreNotFound("response", response_id)

    def _fail_unfinished(self, where: str, args: tuple, message: str) -> list[str]:
        """Mark ``failed`` the unfinished responses that match ``where`` (rows locked, so that two
        replicas expiring at once agree)."""
        with self._tx() as db:
            rows = db.execute(f"SELECT id, body FROM responses WHERE status IN (?, ?) AND ({where}){self.FOR_UPDATE}",
                              (*UNFINISHED, *args)).fetchall()
            for row in rows:
                body = json.loads(row["body"])
                body.update(status="failed", error={"code": "server_error", "message": message})
                db.execute("UPDATE responses SET status = 'failed', body = ? WHERE id = ?",
                           (json.dumps(body), row["id"]))
        if rows:
            log.warning("%d unfinished background response(s) marked failed: %s", len(rows), message)
        return [row["id"] for row in rows]

    # -- assistants -----------------------------------------------------------------------------------------

    def create_assistant(self, fields: dict[str, Any], *, who: Principal = OPEN) -> dict[str, Any]:
        assistant_id = new_id("asst_")
        body = {k: fields.get(k) for k in ASSISTANT_FIELDS}
        body["tools"] = body["tools"] or []
        body["metadata"] = body["metadata"] or {}
        with self._tx() as db:
            db.execute("INSERT INTO assistants (id, created_at, body, principal) VALUES (?, ?, ?, ?)",
                       (assistant_id, int(time.time()), json.dumps(body), who.hash))
            self._link_files(db, assistant_id, fields.get("file_ids") or [], who)
        return self.get_assistant(assistant_id, who=who)

    def get_assistant(self, assistant_id: str, *, who: Principal = OPEN) -> dict[str, Any]:
        return self._assistants([self._get("assistants", "*", assistant_id, "assistant", who)])[0]

    def list_assistants(self, *, limit: int, order: str, after: str | None, before: str | None,
                        who: Principal = OPEN) -> Page:
        rows, more = self._page("assistants", *self._visible(who), limit=limit, order=order, after=after,
                                before=before)
        return Page(self._assistants(rows), more)

    def update_assistant(self, assistant_id: str, fields: dict[str, Any], *,
                         who: Principal = OPEN) -> dict[str, Any]:
        visible, args = self._visible(who)
        with self._tx() as db:
            row = db.execute(f"SELECT body FROM assistants WHERE id = ? AND {visible}{self.FOR_UPDATE}",
                             (assistant_id, *args)).fetchone()
            if row is None:
                raise StoreNotFound("assistant", assistant_id)
            body = json.loads(row["body"])
            body.update({k: v for k, v in fields.items() if k in ASSISTANT_FIELDS})
            db.execute("UPDATE assistants SET body = ? WHERE id = ?", (json.dumps(body), assistant_id))
            if "file_ids" in fields:
                db.execute("DELETE FROM assistant_files WHERE assistant_id = ?", (assistant_id,))
                self._link_files(db, assistant_id, fields["file_ids"] or [], who)
        return self.get_assistant(assistant_id, who=who)

    def delete_assistant(self, assistant_id: str, *, who: Principal = OPEN) -> None:
        self._delete("assistants", assistant_id, "assistant", who)

    # -- links ----------------------------------------------------------------------------------------------

    def attach_file(self, assistant_id: str, file_id: str, *, who: Principal = OPEN) -> dict[str, Any]:
        with self._tx() as db:
            self._require(db, "assistants", assistant_id, "assistant", who)
            self._link_files(db, assistant_id, [file_id], who)
        return self.get_assistant_file(assistant_id, file_id, who=who)

    def get_assistant_file(self, assistant_id: str, file_id: str, *, who: Principal = OPEN) -> dict[str, Any]:
        self.get_assistant(assistant_id, who=who)
        rows = self._query("SELECT * FROM assistant_files WHERE assistant_id = ? AND file_id = ?",
                           (assistant_id, file_id))
        if not rows:
            raise StoreNotFound("file", file_id)
        return self._link(rows[0])

    def list_assistant_files(self, assistant_id: str, *, limit: int, order: str, after: str | None,
                             before: str | None, who: Principal = OPEN) -> Page:
        self.get_assistant(assistant_id, who=who)
        rows, more = self._page("assistant_files", "assistant_id = ?", (assistant_id,), limit=limit, order=order,
                                after=after, before=before, id_column="file_id")
        return Page([self._link(r) for r in rows], more)

    def detach_file(self, assistant_id: str, file_id: str, *, who: Principal = OPEN) -> None:
        with self._tx() as db:
            self._require(db, "assistants", assistant_id, "assistant", who)
            if db.execute("DELETE FROM assistant_files WHERE assistant_id = ? AND file_id = ?",
                          (assistant_id, file_id)).rowcount == 0:
                raise StoreNotFound("file", file_id)

    # -- files ----------------------------------------------------------------------------------------------

    def staging_path(self) -> Path:
        return self.blobs.staging_path()

    def create_file(self, staged: Path, *, filename: str, purpose: str, who: Principal = OPEN) -> dict[str, Any]:
        file_id = new_id("file-")
        size = self.blobs.put(FILES + file_id, staged)
        try:
            with self._tx() as db:
                db.execute("INSERT INTO files (id, created_at, bytes, filename, purpose, principal) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (file_id, int(time.time()), size, filename, purpose, who.hash))
        except BaseException:
            self.blobs.delete(FILES + file_id)
            raise
        return self.get_file(file_id, who=who)

    def get_file(self, file_id: str, *, who: Principal = OPEN) -> dict[str, Any]:
        return self._file(self._get("files", "*", file_id, "file", who))

    def list_files(self, *, purpose: str | None, limit: int, order: str, after: str | None,
                   before: str | None, who: Principal = OPEN) -> Page:
        visible, args = self._visible(who)
        if purpose is not None:
            visible, args = f"purpose = ? AND {visible}", (purpose, *args)
        rows, more = self._page("files", visible, args, limit=limit, order=order, after=after, before=before)
        return Page([self._file(r) for r in rows], more)

    def file_path(self, file_id: str, *, who: Principal = OPEN) -> Path:
        self.get_file(file_id, who=who)
        try:
            return self.blobs.fetch(FILES + file_id)
        except BlobNotFound:
            log.error("file record %s has no stored bytes", file_id)
            raise StoreNotFound("file", file_id) from None

    def delete_file(self, file_id: str, *, who: Principal = OPEN) -> None:
        self._delete("files", file_id, "file", who)
        self.blobs.delete(FILES + file_id)

    # -- retention ------------------------------------------------------------------------------------------

    def response_ids_before(self, before: float, limit: int) -> list[str]:
        rows = self._query("SELECT id FROM responses WHERE created_at < ? AND status NOT IN (?, ?) ORDER BY seq "
                           "LIMIT ?", (before, *UNFINISHED, limit))
        return [row["id"] for row in rows]

    def file_ids_before(self, before: float, limit: int) -> list[str]:
        rows = self._query("SELECT id FROM files WHERE created_at < ? ORDER BY seq LIMIT ?", (before, limit))
        return [row["id"] for row in rows]
