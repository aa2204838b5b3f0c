"""The persistent store behind assistants, files and stored responses: a small interface with two
databases behind it, SQLite (one process, the default) and PostgreSQL (several replicas share it).

Records are plain dicts in the API's own shapes; the store assigns ids and timestamps. All methods
are blocking and are called from the thread pool. Stored bytes (uploads) live in a blob store
(``store.blobs``); a record is committed only once its bytes are durable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from localai_aio.principal import OPEN, Principal


class StoreNotFound(LookupError):
    """No such object; ``kind`` and ``object_id`` name it."""

    def __init__(self, kind: str, object_id: str):
        super().__init__(f"No {kind} found with id '{object_id}'")
        self.kind = kind
        self.object_id = object_id


class StoreUnavailable(Exception):
    """The database cannot be reached now (it is restarting, the network is down): worth a retry."""


@dataclass(frozen=True)
class Page:
    data: list[dict[str, Any]]
    has_more: bool


class Store(Protocol):
    """``who`` is the principal asking: an admin (and ``OPEN``, a server without keys, the default) sees
    every row; anyone else only the rows made with its key, and gets ``StoreNotFound`` for the others, as if
    they did not exist. What a principal creates is recorded with its key's hash."""

    # assistants
    def create_assistant(self, fields: dict[str, Any], *, who: Principal = OPEN) -> dict[str, Any]: ...

    def get_assistant(self, assistant_id: str, *, who: Principal = OPEN) -> dict[str, Any]: ...

    def list_assistants(self, *, limit: int, order: str, after: str | None, before: str | None,
                        who: Principal = OPEN) -> Page: ...

    def update_assistant(self, assistant_id: str, fields: dict[str, Any], *,
                         who: Principal = OPEN) -> dict[str, Any]: ...

    def delete_assistant(self, assistant_id: str, *, who: Principal = OPEN) -> None: ...

    # assistant <-> file links: both must be ``who``'s to be linked
    def attach_file(self, assistant_id: str, file_id: str, *, who: Principal = OPEN) -> dict[str, Any]: ...

    def get_assistant_file(self, assistant_id: str, file_id: str, *, who: Principal = OPEN) -> dict[str, Any]: ...

    def list_assistant_files(self, assistant_id: str, *, limit: int, order: str, after: str | None,
                             before: str | None, who: Principal = OPEN) -> Page: ...

    def detach_file(self, assistant_id: str, file_id: str, *, who: Principal = OPEN) -> None: ...

    # responses (the Responses API): the response as returned, the conversation it ends, its input items
    def save_response(self, response: dict[str, Any], history: list[dict[str, Any]] | None = None,
                      input_items: list[dict[str, Any]] | None = None, *, owner: str | None = None,
                      lease: float = 0.0, who: Principal = OPEN) -> None:
        """Insert or update; a new background response is inserted leased to ``owner`` for ``lease`` s. A new
        response is recorded as ``who``'s; an update is the server's own (its progress) and keeps that."""
        ...

    def get_response(self, response_id: str, *, who: Principal = OPEN) -> dict[str, Any]: ...

    def response_history(self, response_id: str, *, who: Principal = OPEN) -> list[dict[str, Any]]: ...

    def list_input_items(self, response_id: str, *, limit: int, order: str, after: str | None,
                         before: str | None, who: Principal = OPEN) -> Page: ...

    def delete_response(self, response_id: str, *, who: Principal = OPEN) -> None: ...

    # background responses: the replica running one holds a lease on it, renewed while it runs
    def renew_leases(self, owner: str, lease: float) -> set[str]:
        """Extend ``owner``'s leases; returns the ids of its responses whose cancellation was asked for."""
        ...

    def expire_leases(self) -> list[str]:
        """Mark ``failed`` the unfinished responses whose lease ran out (their replica died)."""
        ...

    def request_cancel(self, response_id: str, *, who: Principal = OPEN) -> None:
        """Ask the replica running a background response to cancel it (it sees this when renewing)."""
        ...

    # files
    def staging_path(self) -> Path:
        """A fresh path, on the store's own disk, for an upload being received."""
        ...

    def create_file(self, staged: Path, *, filename: str, purpose: str, who: Principal = OPEN) -> dict[str, Any]:
        """Take over a fully written ``staged`` upload (moved, never copied) and record it."""
        ...

    def get_file(self, file_id: str, *, who: Principal = OPEN) -> dict[str, Any]: ...

    def list_files(self, *, purpose: str | None, limit: int, order: str, after: str | None,
                   before: str | None, who: Principal = OPEN) -> Page: ...

    def file_path(self, file_id: str, *, who: Principal = OPEN) -> Path: ...

    def delete_file(self, file_id: str, *, who: Principal = OPEN) -> None: ...

    # retention: what is old enough to delete (``delete_response`` and ``delete_file`` delete it)
    def response_ids_before(self, before: float, limit: int) -> list[str]:
        """Ids of finished responses created before ``before`` (Unix seconds), oldest first, at most ``limit``;
        a background response still running is never among them."""
        ...

    def file_ids_before(self, before: float, limit: int) -> list[str]:
        """Ids of files created before ``before`` (Unix seconds), oldest first, at most ``limit``."""
        ...

    def close(self) -> None: ...
