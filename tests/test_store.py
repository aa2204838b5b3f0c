"""The store, run the same way on SQLite and on a real PostgreSQL server: records, pagination, links,
leases of background responses, migrations (fresh and upgraded), concurrency, outages."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from localai_aio.store import migrate
from localai_aio.store.base import StoreNotFound, StoreUnavailable
from localai_aio.store.blobs import LocalBlobs
from localai_aio.store.sql import SQLStore


def open_store(kind: str, request: pytest.FixtureRequest, root: Path, target: int | None = None) -> SQLStore:
    blobs = LocalBlobs(root)
    if kind == "sqlite":
        from localai_aio.store.sqlite import SQLiteStore

        return SQLiteStore(root, blobs, target_version=target)
    from localai_aio.store.postgres import PostgresStore

    url = request.node.__dict__.setdefault("pg_url", request.getfixturevalue("database_url"))
    return PostgresStore(url, blobs, target_version=target)


@pytest.fixture(params=["sqlite", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStore]:
    made = open_store(kind, request, tmp_path)
    yield made
    made.close()


def response(response_id: str, status: str = "completed", **extra: object) -> dict:
    return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
            "background": True, **extra}


def stage(store: SQLStore, data: bytes) -> Path:
    path = store.staging_path()
    path.write_bytes(data)
    return path


def test_assistants_round_trip_and_pagination(store: SQLStore) -> None:
    made = [store.create_assistant({"model": "m", "name": f"a{i}"}) for i in range(5)]
    assert made[0]["object"] == "assistant" and made[0]["tools"] == [] and made[0]["metadata"] == {}
    assert store.get_assistant(made[2]["id"])["name"] == "a2"
    first = store.list_assistants(limit=2, order="asc", after=None, before=None)
    assert [a["name"] for a in first.data] == ["a0", "a1"] and first.has_more
    rest = store.list_assistants(limit=10, order="asc", after=first.data[-1]["id"], before=None)
    assert [a["name"] for a in rest.data] == ["a2", "a3", "a4"] and not rest.has_more
    newest = store.list_assistants(limit=2, order="desc", after=None, before=None)
    assert [a["name"] for a in newest.data] == ["a4", "a3"]
    back = store.list_assistants(limit=2, order="asc", after=None, before=made[3]["id"])
    assert [a["name"] for a in back.data] == ["a1", "a2"] and back.has_more
    updated = store.update_assistant(made[1]["id"], {"name": "renamed", "metadata": {"k": "v"}})
    assert (updated["name"], updated["metadata"], updated["model"]) == ("renamed", {"k": "v"}, "m")
    store.delete_assistant(made[1]["id"])
    with pytest.raises(StoreNotFound, match=made[1]["id"]):
        store.get_assistant(made[1]["id"])
    with pytest.raises(StoreNotFound):
        store.delete_assistant(made[1]["id"])


def test_files_links_and_bytes(store: SQLStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 10
    made = store.create_file(stage(store, data), filename="a.bin", purpose="assistants")
    assert (made["bytes"], made["filename"], made["purpose"], made["status"]) == (len(data), "a.bin", "assistants",
                                                                                  "processed")
    assert store.file_path(made["id"]).read_bytes() == data
    other = store.create_file(stage(store, b"x"), filename="b.txt", purpose="batch")
    assert [f["id"] for f in store.list_files(purpose="batch", limit=10, order="asc", after=None,
                                              before=None).data] == [other["id"]]
    assistant = store.create_assistant({"model": "m", "file_ids": [made["id"], made["id"]]})
    assert assistant["file_ids"] == [made["id"]]
    link = store.attach_file(assistant["id"], other["id"])
    assert link == {"id": other["id"], "object": "assistant.file", "created_at": link["created_at"],
                    "assistant_id": assistant["id"]}
    store.attach_file(assistant["id"], other["id"])  # twice: still one link
    assert store.get_assistant(assistant["id"])["file_ids"] == [made["id"], other["id"]]
    with pytest.raises(StoreNotFound, match="file-missing"):
        store.create_assistant({"model": "m", "file_ids": ["file-missing"]})
    store.delete_file(made["id"])  # its links go with it
    assert store.get_assistant(assistant["id"])["file_ids"] == [other["id"]]
    assert not (tmp_path / "files" / made["id"]).exists()
    store.detach_file(assistant["id"], other["id"])
    with pytest.raises(StoreNotFound):
        store.detach_file(assistant["id"], other["id"])


def test_responses_history_and_items(store: SQLStore) -> None:
    items = [{"id": f"msg_{i}", "type": "message", "content": str(i)} for i in range(3)]
    store.save_response(response("resp_1", "in_progress"), [{"role": "user", "content": "hi"}], items)
    store.save_response(response("resp_1", "completed", output=["x"]),
                        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert store.get_response("resp_1")["output"] == ["x"]
    assert [m["role"] for m in store.response_history("resp_1")] == ["user", "assistant"]
    page = store.list_input_items("resp_1", limit=2, order="desc", after=None, before=None)
    assert [i["id"] for i in page.data] == ["msg_2", "msg_1"] and page.has_more
    store.delete_response("resp_1")
    with pytest.raises(StoreNotFound):
        store.list_input_items("resp_1", limit=2, order="asc", after=None, before=None)


def test_leases_renew_cancel_and_expire(store: SQLStore) -> None:
    store.save_response(response("resp_a", "in_progress"), owner="replica-1", lease=30)
    store.save_response(response("resp_b", "queued"), owner="replica-2", lease=0.2)
    assert store.renew_leases("replica-1", 30) == set()
    store.request_cancel("resp_a")
    assert store.renew_leases("replica-1", 30) == {"resp_a"}
    time.sleep(0.3)  # replica-2 died: its lease runs out
    assert store.expire_leases() == ["resp_b"]
    failed = store.get_response("resp_b")
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert store.get_response("resp_a")["status"] == "in_progress"  # its owner renews it
    assert store.expire_leases() == []
    with pytest.raises(StoreNotFound):
        store.request_cancel("resp_none")


def backdate(store: SQLStore, table: str, object_id: str, created_at: float) -> None:
    """Make a record look as old as ``created_at`` (the store itself stamps the time it is created)."""
    with store._tx() as db:
        db.execute(f"UPDATE {table} SET created_at = ? WHERE id = ?", (int(created_at), object_id))


def test_ids_created_before_for_retention(store: SQLStore) -> None:
    now = time.time()
    store.save_response(response("resp_old", created_at=int(now) - 7200))
    store.save_response(response("resp_running", "in_progress", created_at=int(now) - 7200), owner="r", lease=30)
    store.save_response(response("resp_new"))
    old, new = (store.create_file(stage(store, b"x"), filename=name, purpose="assistants") for name in ("o", "n"))
    backdate(store, "files", old["id"], now - 7200)
    assert store.response_ids_before(now - 3600, 10) == ["resp_old"]  # never one still running
    assert store.file_ids_before(now - 3600, 10) == [old["id"]]
    assert store.file_ids_before(now + 10, 1) == [old["id"]]  # oldest first, at most the limit
    assert set(store.response_ids_before(now + 10, 10)) == {"resp_old", "resp_new"}
    store.delete_file(old["id"])
    assert store.file_ids_before(now - 3600, 10) == [] and store.get_file(new["id"])["filename"] == "n"


def test_concurrent_creates_neither_duplicate_nor_lose(store: SQLStore) -> None:
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda i: store.create_assistant({"model": "m", "name": str(i)})["id"], range(80)))
    listed = store.list_assistants(limit=1000, order="asc", after=None, before=None).data
    assert sorted(a["id"] for a in listed) == sorted(made) and len(set(made)) == 80


def test_concurrent_updates_of_one_assistant_keep_every_field(store: SQLStore) -> None:
    """An update reads the stored body, merges its fields and writes it back: without the row lock,
    two updates of different fields at once (two replicas) would lose one of them."""
    for _ in range(15):
        made = store.create_assistant({"model": "m"})
        barrier = threading.Barrier(2)

        def update(field: str, assistant_id: str = made["id"], barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            store.update_assistant(assistant_id, {field: "set"})

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(update, ["name", "description"]))
        final = store.get_assistant(made["id"])
        assert (final["name"], final["description"]) == ("set", "set")


def test_start_sweeps_orphan_bytes_and_reports_missing(kind: str, request: pytest.FixtureRequest,
                                                       tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(kind, request, tmp_path)
    kept = store.create_file(stage(store, b"kept"), filename="a.txt", purpose="assistants")
    store.close()
    orphan = tmp_path / "files" / "file-0123456789abcdef01234567"
    orphan.write_bytes(b"orphan")
    with caplog.at_level("WARNING"):
        store = open_store(kind, request, tmp_path)
    if kind == "sqlite":  # one process: every orphan is a crash's leftover
        assert not orphan.exists() and "removed 1 stored file(s)" in caplog.text
    else:  # replicas: a young orphan may be an upload another replica is committing now
        assert orphan.exists()
        removed, _ = store.sweep_blobs(grace=0)
        assert removed == 1 and not orphan.exists()
    (tmp_path / "files" / kept["id"]).unlink()
    assert store.sweep_blobs(grace=0) == (0, [kept["id"]])
    with pytest.raises(StoreNotFound):
        store.file_path(kept["id"])
    store.close()


def test_migrations_upgrade_keeps_data(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A database at version 1 (the first release's tables) is upgraded at start and keeps its rows."""
    old = open_store(kind, request, tmp_path, target=1)
    with old._tx() as db:  # noqa: SLF001  (rows as the first release wrote them)
        db.execute("INSERT INTO responses (id, created_at, status, body, history) VALUES (?, ?, ?, ?, ?)",
                   ("resp_old", 1, "in_progress", json.dumps(response("resp_old", "in_progress")), "[]"))
        db.execute("INSERT INTO assistants (id, created_at, body) VALUES (?, ?, ?)",
                   ("asst_old", 1, json.dumps({"model": "m", "name": "kept", "tools": [], "metadata": {}})))
    with old._tx() as db:  # noqa: SLF001
        versions = [r["version"] for r in db.execute("SELECT version FROM schema_migrations").fetchall()]
    assert versions == [1]
    old.close()
    store = open_store(kind, request, tmp_path)
    try:
        with store._tx() as db:  # noqa: SLF001
            versions = [r["version"] for r in db.execute("SELECT version FROM schema_migrations ORDER BY version")
                        .fetchall()]
        assert versions == list(range(1, migrate.latest(kind) + 1))
        assert [a["name"] for a in store.list_assistants(limit=5, order="asc", after=None, before=None).data] == [
            "kept"]
        # an unfinished response from before leases has no lease: it counts as expired
        assert store.get_response("resp_old")["status"] == "failed"
    finally:
        store.close()


def test_migration_to_principals_keeps_rows_for_admins(kind: str, request: pytest.FixtureRequest,
                                                      tmp_path: Path) -> None:
    """A version 2 database gains the principal columns; its rows, made by nobody in particular, stay and
    are visible to admin keys only."""
    from localai_aio.principal import Principal, key_hash

    old = open_store(kind, request, tmp_path, target=2)
    size = old.blobs.put("files/file-old", stage(old, b"kept bytes"))
    with old._tx() as db:  # noqa: SLF001  (rows as version 2 wrote them)
        db.execute("INSERT INTO files (id, created_at, bytes, filename, purpose) VALUES (?, ?, ?, ?, ?)",
                   ("file-old", 1, size, "f.txt", "assistants"))
        db.execute("INSERT INTO assistants (id, created_at, body) VALUES (?, ?, ?)",
                   ("asst_old", 1, json.dumps({"model": "m", "name": "kept", "tools": [], "metadata": {}})))
        db.execute("INSERT INTO responses (id, created_at, status, body, history) VALUES (?, ?, ?, ?, ?)",
                   ("resp_old", 1, "completed", json.dumps(response("resp_old")), "[]"))
    old.close()
    store = open_store(kind, request, tmp_path)
    admin, user = Principal(key_hash("admin"), admin=True), Principal(key_hash("user"), admin=False)
    try:
        assert [r["principal"] for r in store._query("SELECT principal FROM files")] == [None]  # noqa: SLF001
        assert store.get_file("file-old", who=admin)["filename"] == "f.txt"
        assert store.file_path("file-old", who=admin).read_bytes() == b"kept bytes"
        assert store.get_assistant("asst_old", who=admin)["name"] == "kept"
        assert store.get_response("resp_old", who=admin)["id"] == "resp_old"
        with pytest.raises(StoreNotFound):
            store.get_file("file-old", who=user)
        with pytest.raises(StoreNotFound):
            store.get_assistant("asst_old", who=user)
        with pytest.raises(StoreNotFound):
            store.response_history("resp_old", who=user)
        assert store.list_files(purpose=None, limit=5, order="asc", after=None, before=None, who=user).data == []
        mine = store.create_file(stage(store, b"new"), filename="g.txt", purpose="assistants", who=user)
        assert [f["id"] for f in store.list_files(purpose=None, limit=5, order="asc", after=None, before=None,
                                                  who=user).data] == [mine["id"]]
        rows = store._query("SELECT principal FROM files WHERE id = ?", (mine["id"],))  # noqa: SLF001
        assert [r["principal"] for r in rows] == [key_hash("user")]  # the hash, never the key
    finally:
        store.close()


def test_postgres_replicas_starting_together_migrate_once(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from localai_aio.store.postgres import PostgresStore

    url = request.getfixturevalue("database_url")
    barrier = threading.Barrier(4)

    def start(i: int) -> PostgresStore:
        barrier.wait()
        return PostgresStore(url, LocalBlobs(tmp_path / str(i)))

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(start, range(4)))
    try:
        rows = stores[0]._query("SELECT version FROM schema_migrations ORDER BY version")  # noqa: SLF001
        assert [r["version"] for r in rows] == list(range(1, migrate.latest("postgres") + 1))
        made = stores[1].create_assistant({"model": "m"})
        assert stores[3].get_assistant(made["id"])["id"] == made["id"]
    finally:
        for store in stores:
            store.close()


def test_postgres_outage_is_unavailable_then_recovers(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The database goes away: calls raise StoreUnavailable within seconds (the API's 503), and work again
    once it is back, without reopening the store. Uses its own server: stopping the session's would
    disturb other tests."""
    from conftest import free_port
    from localai_aio.store.postgres import PostgresStore
    from pg_server import postgres_server

    with postgres_server(free_port()) as server:
        store = PostgresStore(server.create_database("outage"), LocalBlobs(tmp_path))
        try:
            made = store.create_assistant({"model": "m"})
            server.stop("immediate")
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.get_assistant(made["id"])
            with pytest.raises(StoreUnavailable):
                store.create_assistant({"model": "m"})
            assert time.monotonic() - started < 15
            server.start()
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(StoreUnavailable):
                    assert store.get_assistant(made["id"])["id"] == made["id"]
                    break
                assert time.monotonic() < deadline, "the store did not recover"
                time.sleep(0.5)
        finally:
            store.close()


def test_postgres_start_failure_names_the_server_without_its_password() -> None:
    from conftest import free_port
    from localai_aio.store.postgres import PostgresStore

    pytest.importorskip("psycopg")
    url = f"postgresql://app:s3cret@127.0.0.1:{free_port()}/db"
    with pytest.raises(StoreUnavailable, match=r"cannot connect to PostgreSQL at postgresql://app:\*\*\*@127") as err:
        PostgresStore(url, LocalBlobs(Path("/nonexistent")), start_timeout=1)
    assert "s3cret" not in str(err.value)
