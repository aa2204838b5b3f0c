"""Assistants and files: shapes, limits, pagination, links, durability."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import openai
import pytest

A = "/v1/assistants"
MODEL = "tiny-llama"
ASSISTANT_KEYS = {"id", "object", "created_at", "name", "description", "model", "instructions", "tools",
                  "file_ids", "metadata"}


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, settings):  # noqa: ANN001, ANN201
    """Every API test here runs on both stores: SQLite (conftest's settings), and a real PostgreSQL server."""
    if request.param == "postgres":
        return settings.replace(database_url=request.getfixturevalue("database_url"))
    return settings


async def create(client, **fields) -> dict:  # noqa: ANN001
    resp = await client.post(A, json={"model": MODEL, **fields})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def upload(client, data: bytes = b"hello", filename: str = "notes.txt", purpose: str = "assistants"):  # noqa: ANN001, ANN201
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file", data, filename=filename, content_type="text/plain")
    return await client.post("/v1/files", data=form)


async def test_create_and_retrieve_shape(client) -> None:  # noqa: ANN001
    made = await create(client, name="Math tutor", instructions="Be exact.", metadata={"team": "a"},
                        tools=[{"type": "code_interpreter"}, {"type": "function", "function": {
                            "name": "add", "description": "add", "parameters": {"type": "object"}}}])
    assert set(made) == ASSISTANT_KEYS
    assert made["id"].startswith("asst_") and made["object"] == "assistant"
    assert (made["name"], made["model"], made["instructions"]) == ("Math tutor", MODEL, "Be exact.")
    assert made["description"] is None and made["file_ids"] == [] and made["metadata"] == {"team": "a"}
    assert made["tools"][0] == {"type": "code_interpreter"}
    got = await (await client.get(f"{A}/{made['id']}")).json()
    assert got == made


async def test_modify_and_delete(client) -> None:  # noqa: ANN001
    made = await create(client, name="a")
    changed = await (await client.post(f"{A}/{made['id']}", json={"name": "b", "metadata": {"k": "v"}})).json()
    assert changed["name"] == "b" and changed["metadata"] == {"k": "v"} and changed["model"] == MODEL
    assert changed["created_at"] == made["created_at"]
    resp = await client.delete(f"{A}/{made['id']}")
    assert await resp.json() == {"id": made["id"], "object": "assistant.deleted", "deleted": True}
    for method in ("get", "delete"):
        resp = await client.request(method, f"{A}/{made['id']}")
        assert resp.status == 404
        err = (await resp.json())["error"]
        assert err["param"] == "assistant_id" and made["id"] in err["message"]
    resp = await client.post(f"{A}/asst_nope", json={"name": "x"})
    assert resp.status == 404


async def test_pagination(client) -> None:  # noqa: ANN001
    ids = [(await create(client, name=f"n{i}"))["id"] for i in range(5)]
    page = await (await client.get(A, params={"limit": "2"})).json()
    assert page["object"] == "list" and [a["id"] for a in page["data"]] == [ids[4], ids[3]]
    assert page["first_id"] == ids[4] and page["last_id"] == ids[3] and page["has_more"] is True
    page = await (await client.get(A, params={"limit": "2", "after": ids[3]})).json()
    assert [a["id"] for a in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    page = await (await client.get(A, params={"limit": "2", "after": ids[1]})).json()
    assert [a["id"] for a in page["data"]] == [ids[0]] and page["has_more"] is False
    page = await (await client.get(A, params={"order": "asc", "limit": "3"})).json()
    assert [a["id"] for a in page["data"]] == ids[:3]
    page = await (await client.get(A, params={"order": "asc", "before": ids[3], "limit": "2"})).json()
    assert [a["id"] for a in page["data"]] == [ids[1], ids[2]] and page["has_more"] is True
    page = await (await client.get(A)).json()
    assert len(page["data"]) == 5 and page["has_more"] is False
    for params in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"order": "up"}):
        resp = await client.get(A, params=params)
        assert resp.status == 400, params


@pytest.mark.parametrize(("fields", "param", "status"), [
    ({"name": "n" * 257}, "name", 400),
    ({"description": "d" * 513}, "description", 400),
    ({"instructions": "i" * 256_001}, "instructions", 400),
    ({"tools": [{"type": "retrieval"}] * 129}, "tools", 400),
    ({"tools": [{"type": "browser"}]}, "tools.0.type", 400),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function", 400),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function", 400),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}]},
     "tools.0.function.parameters", 400),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", 400),
    ({"metadata": {"k" * 65: "v"}}, "metadata", 400),
    ({"metadata": {"k": "v" * 513}}, "metadata", 400),
    ({"metadata": {"k": 5}}, "metadata.k.value", 400),
    ({"file_ids": [f"file-{i}" for i in range(21)]}, "file_ids", 400),
    ({"file_ids": ["file-missing"]}, "file_id", 404),
    ({"model": "not-configured"}, "model", 404),
    ({"name": 5}, "name", 400),
])
async def test_limits(client, fields: dict, param: str, status: int) -> None:  # noqa: ANN001
    resp = await client.post(A, json={"model": MODEL, **fields})
    assert resp.status == status, await resp.text()
    assert (await resp.json())["error"]["param"] == param


async def test_limits_at_the_boundary_are_accepted(client) -> None:  # noqa: ANN001
    await create(client, name="n" * 256, description="d" * 512, instructions="i" * 256_000,
                 tools=[{"type": "file_search"}] * 128, metadata={f"{i:064d}": "v" * 512 for i in range(16)})
    resp = await client.post(A, json={"name": "x"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "model"


async def test_files_upload_list_content_delete(client, tmp_path: Path) -> None:  # noqa: ANN001
    resp = await upload(client, b"\x00binary\xff" * 100, filename="../../etc/passwd")
    assert resp.status == 200, await resp.text()
    made = await resp.json()
    assert made["id"].startswith("file-") and made["object"] == "file" and made["bytes"] == 800
    assert "/" not in made["filename"] and made["filename"].endswith("passwd") and made["purpose"] == "assistants"
    stored = list((tmp_path / "data" / "files").iterdir())
    assert [p.name for p in stored] == [made["id"]]  # a server-made name, nothing else written
    other = await (await upload(client, b"x", purpose="batch")).json()
    listing = await (await client.get("/v1/files")).json()
    assert listing == {"object": "list", "data": [other, made], "first_id": other["id"], "last_id": made["id"],
                       "has_more": False}  # newest first, as OpenAI lists them
    filtered = await (await client.get("/v1/files", params={"purpose": "batch"})).json()
    assert [f["id"] for f in filtered["data"]] == [other["id"]]
    page = await (await client.get("/v1/files", params={"limit": "1", "order": "asc"})).json()
    assert [f["id"] for f in page["data"]] == [made["id"]] and page["has_more"] is True
    page = await (await client.get("/v1/files", params={"limit": "1", "order": "asc", "after": made["id"]})).json()
    assert [f["id"] for f in page["data"]] == [other["id"]] and page["has_more"] is False
    assert (await client.get("/v1/files", params={"limit": "10001"})).status == 400
    assert await (await client.get(f"/v1/files/{made['id']}")).json() == made
    content = await client.get(f"/v1/files/{made['id']}/content")
    assert await content.read() == b"\x00binary\xff" * 100
    assert await (await client.delete(f"/v1/files/{made['id']}")).json() == \
        {"id": made["id"], "object": "file", "deleted": True}
    assert (await client.get(f"/v1/files/{made['id']}/content")).status == 404
    assert not (tmp_path / "data" / "files" / made["id"]).exists()


async def test_file_errors(client) -> None:  # noqa: ANN001
    resp = await upload(client, purpose="nonsense")
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "purpose"
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("purpose", "assistants")
    form.add_field("other", "x")
    resp = await client.post("/v1/files", data=form)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "file"
    resp = await client.post("/v1/files", json={"purpose": "assistants"})
    assert resp.status == 415
    for bad in ("..%2F..%2Fetc%2Fpasswd", "file-..", "%2e%2e"):
        resp = await client.get(f"/v1/files/{bad}/content")
        assert resp.status == 404, bad


async def test_upload_over_limit_is_413(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    from localai_aio.config import ServerSettings

    client = await make_client(ServerSettings(models_path=str(tmp_path), config_dir=str(tmp_path / "d"),
                                              upload_limit=0.01))
    resp = await upload(client, b"x" * 20_000)
    assert resp.status == 413
    leftovers = [p for p in (tmp_path / "d").rglob("*") if p.is_file() and not p.name.startswith("localai.db")]
    assert leftovers == []  # the partial upload is gone


async def test_assistant_files(client) -> None:  # noqa: ANN001
    f1 = await (await upload(client, b"one")).json()
    f2 = await (await upload(client, b"two")).json()
    made = await create(client, file_ids=[f1["id"]])
    assert made["file_ids"] == [f1["id"]]
    link = await (await client.post(f"{A}/{made['id']}/files", json={"file_id": f2["id"]})).json()
    assert link == {"id": f2["id"], "object": "assistant.file", "created_at": link["created_at"],
                    "assistant_id": made["id"]}
    listing = await (await client.get(f"{A}/{made['id']}/files", params={"order": "asc"})).json()
    assert [f["id"] for f in listing["data"]] == [f1["id"], f2["id"]]
    assert (await (await client.get(f"{A}/{made['id']}/files/{f2['id']}")).json())["id"] == f2["id"]
    resp = await client.delete(f"{A}/{made['id']}/files/{f1['id']}")
    assert await resp.json() == {"id": f1["id"], "object": "assistant.file.deleted", "deleted": True}
    assert (await client.get(f"{A}/{made['id']}/files/{f1['id']}")).status == 404
    assert (await client.post(f"{A}/{made['id']}/files", json={"file_id": "file-nope"})).status == 404
    assert (await client.post(f"{A}/asst_nope/files", json={"file_id": f1["id"]})).status == 404
    # deleting a file removes its links; deleting an assistant removes its links but not the files
    await client.delete(f"/v1/files/{f2['id']}")
    assert (await (await client.get(f"{A}/{made['id']}")).json())["file_ids"] == []
    other = await create(client, file_ids=[f1["id"]])
    await client.delete(f"{A}/{other['id']}")
    assert (await client.get(f"/v1/files/{f1['id']}")).status == 200


async def test_fifty_concurrent_creates(client) -> None:  # noqa: ANN001
    made = await asyncio.gather(*(create(client, name=f"c{i}") for i in range(50)))
    ids = {m["id"] for m in made}
    assert len(ids) == 50
    listed: set[str] = set()
    after = None
    while True:
        params = {"limit": "100"} | ({"after": after} if after else {})
        page = await (await client.get(A, params=params)).json()
        listed |= {a["id"] for a in page["data"]}
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert ids <= listed


# -- real server processes ------------------------------------------------------------------------------------

def _start(server_process, models: Path, data: Path):  # noqa: ANN001, ANN202
    return server_process("--models-path", str(models), "--config-dir", str(data), "--threads", "1")


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client marks its assistants API so
def test_openai_client_and_restart(server_process, models_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    data = tmp_path / "state"
    server = _start(server_process, models_dir, data)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        uploaded = client.files.create(file=("notes.txt", b"remember this"), purpose="assistants")
        assert uploaded.id.startswith("file-") and uploaded.bytes == 13
        made = client.beta.assistants.create(model=MODEL, name="keeper", instructions="Keep notes.",
                                             metadata={"k": "v"}, extra_body={"file_ids": [uploaded.id]})
        assert made.id.startswith("asst_") and made.name == "keeper"
        assert [a.id for a in client.beta.assistants.list()] == [made.id]
        updated = client.beta.assistants.update(made.id, name="keeper 2")
        assert updated.name == "keeper 2"
        second = client.beta.assistants.create(model=MODEL, name="gone")
        assert client.beta.assistants.delete(second.id).deleted is True
        with pytest.raises(openai.NotFoundError):
            client.beta.assistants.retrieve(second.id)
    assert server.stop() == 0
    server = _start(server_process, models_dir, data)  # a restart keeps everything
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        kept = client.beta.assistants.retrieve(made.id)
        assert kept.name == "keeper 2" and kept.metadata == {"k": "v"}
        assert [a.id for a in client.beta.assistants.list()] == [made.id]
        assert client.files.content(uploaded.id).read() == b"remember this"
        assert [f.id for f in client.files.list()] == [uploaded.id]


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_sigkill_during_writes_loses_nothing_acknowledged(server_process, models_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    data = tmp_path / "state"
    server = _start(server_process, models_dir, data)
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            body = json.dumps({"model": MODEL, "name": f"w{n}-{i}", "instructions": "x" * 2000}).encode()
            request = urllib.request.Request(server.url + A, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    acknowledged.append(json.loads(resp.read())["id"])
            except (urllib.error.URLError, ConnectionError, OSError):
                return
            i += 1

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in writers:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    stop.set()
    for t in writers:
        t.join(15)
    assert len(acknowledged) >= 60
    with contextlib.closing(sqlite3.connect(data / "localai.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    server = _start(server_process, models_dir, data)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        stored = {a.id for a in client.beta.assistants.list(limit=100)}
        after = None
        page = client.beta.assistants.list(limit=100)
        while page.has_more:
            after = page.data[-1].id
            page = client.beta.assistants.list(limit=100, after=after)
            stored |= {a.id for a in page.data}
    assert set(acknowledged) <= stored


def test_start_sweeps_bytes_no_record_points_to(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A crash between an upload's rename and its COMMIT, or between a delete's COMMIT and its unlink,
    leaves stored bytes without a record: the next start removes them and reports records without bytes."""
    import logging

    from localai_aio.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path)
    staged = store.staging_path()
    staged.write_bytes(b"kept")
    kept = store.create_file(staged, filename="a.txt", purpose="assistants")
    store.close()
    (tmp_path / "files" / "file-0123456789abcdef01234567").write_bytes(b"orphan")
    (tmp_path / "files" / ".upload-deadbeef").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="localai_aio.store.sqlite"):
        store = SQLiteStore(tmp_path)
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [kept["id"]]
    assert "removed 1 stored file(s) that no record points to" in caplog.text
    (tmp_path / "files" / kept["id"]).unlink()
    store.close()
    with caplog.at_level(logging.WARNING, logger="localai_aio.store.sqlite"):
        SQLiteStore(tmp_path).close()
    assert f"1 file record(s) have no stored bytes: {kept['id']}" in caplog.text


async def test_upload_opens_its_staging_file_once(client, monkeypatch) -> None:  # noqa: ANN001
    opened: list[str] = []
    real_open = Path.open

    def counting_open(self: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if self.parent.name == ".staging":
            opened.append(args[0] if args else kwargs.get("mode", "r"))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    data = bytes(range(256)) * 4096  # 1 MiB: many chunks
    made = await (await upload(client, data)).json()
    assert made["bytes"] == len(data)
    assert opened.count("wb") == 1 and "ab" not in opened
    assert await (await client.get(f"/v1/files/{made['id']}/content")).read() == data
