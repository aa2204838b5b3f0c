"""``--retention-days``: stored responses, uploaded files and generated images expire, swept in the
background; what is newer stays, and a background response still running is never swept. Run on SQLite
and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from localai_aio.config import ServerSettings, load_settings
from localai_aio.server import keys, retention
from localai_aio.store.generated_images import PREFIX
from localai_aio.store.generated_images import save_image as _save
from test_assistants import upload
from test_store import backdate, response

DAY = 86400


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> str:
    return "" if request.param == "sqlite" else request.getfixturevalue("database_url")


def test_retention_setting() -> None:
    assert load_settings({}, environ={}).retention_days == 0
    settings = load_settings({}, environ={"LOCALAI_RETENTION_DAYS": "0.5"})
    assert settings.retention_days == 0.5 and settings.retention_seconds == DAY / 2
    assert load_settings({"retention_days": "30"}, environ={}).retention_days == 30
    # images go by --generated-max-age, or by the retention when that is shorter
    assert retention.image_max_age(ServerSettings(generated_max_age=3600)) == 3600
    assert retention.image_max_age(ServerSettings(generated_max_age=3600, retention_days=0.01)) == 864
    assert retention.image_max_age(ServerSettings(generated_max_age=3600, retention_days=7)) == 3600
    assert retention.interval(ServerSettings(retention_days=30)) == retention.MAX_INTERVAL
    assert retention.interval(ServerSettings(generated_max_age=1, retention_days=1)) == 1.0


async def make_items(client, now: float) -> dict[str, str]:  # noqa: ANN001
    """An old and a new one of each kind: records dated through the store, images through their files' age."""
    app = client.server.app
    store, blobs = app[keys.STORE], app[keys.BLOBS]
    ids = {}
    for age in ("old", "new"):
        ids[f"{age}_file"] = (await (await upload(client, age.encode())).json())["id"]
        ids[f"{age}_response"] = f"resp_{age}"
        ids[f"{age}_image"] = _save(blobs, b"png")
    created = int(now) - 3 * DAY
    store.save_response(response("resp_old", created_at=created))
    store.save_response(response("resp_new"))
    store.save_response(response("resp_running", "in_progress", created_at=created), owner="elsewhere", lease=60)
    backdate(store, "files", ids["old_file"], created)
    image = Path(app[keys.SETTINGS].config_dir) / PREFIX / ids["old_image"]
    os.utime(image, (created, created))
    return ids


async def status(client, path: str) -> int:  # noqa: ANN001
    return (await client.get(path)).status


async def test_a_sweep_removes_what_is_older_and_keeps_what_is_newer(make_client, tmp_path: Path,  # noqa: ANN001
                                                                     database: str) -> None:
    settings = ServerSettings(models_path=str(tmp_path / "m"), config_dir=str(tmp_path / "d"), database_url=database,
                              retention_days=1, generated_max_age=7 * DAY)
    client = await make_client(settings)
    ids = await make_items(client, time.time())
    assert await status(client, f"/v1/files/{ids['old_file']}") == 200
    swept = await retention.sweep(client.server.app)
    assert swept == retention.Swept(responses=1, files=1, images=1)
    assert await status(client, f"/v1/files/{ids['old_file']}") == 404
    assert await status(client, f"/v1/files/{ids['old_file']}/content") == 404
    assert await status(client, "/v1/responses/resp_old") == 404
    assert await status(client, f"/generated-images/{ids['old_image']}") == 404
    listed = [f["id"] for f in (await (await client.get("/v1/files")).json())["data"]]
    assert listed == [ids["new_file"]]
    assert await status(client, f"/v1/files/{ids['new_file']}/content") == 200
    assert await status(client, "/v1/responses/resp_new") == 200
    assert await status(client, "/v1/responses/resp_running") == 200  # still running elsewhere: never swept
    assert await status(client, f"/generated-images/{ids['new_image']}") == 200
    assert await retention.sweep(client.server.app) == retention.Swept()  # nothing more to do


async def test_without_retention_only_images_expire(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    client = await make_client(ServerSettings(models_path=str(tmp_path / "m"), config_dir=str(tmp_path / "d")))
    ids = await make_items(client, time.time())
    assert await retention.sweep(client.server.app) == retention.Swept(images=1)  # --generated-max-age: 1 h
    assert await status(client, f"/v1/files/{ids['old_file']}") == 200
    assert await status(client, "/v1/responses/resp_old") == 200


async def test_a_large_backlog_goes_in_batches(make_client, tmp_path: Path,  # noqa: ANN001
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "BATCH", 2)
    client = await make_client(ServerSettings(models_path=str(tmp_path / "m"), config_dir=str(tmp_path / "d"),
                                              retention_days=1))
    store = client.server.app[keys.STORE]
    for i in range(5):
        store.save_response(response(f"resp_{i}", created_at=int(time.time()) - 2 * DAY))
    assert (await retention.sweep(client.server.app)).responses == 5
    assert store.response_ids_before(time.time(), 10) == []


async def test_the_background_task_sweeps_without_being_asked(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    # a retention of 2 s: the task sweeps every second
    client = await make_client(ServerSettings(models_path=str(tmp_path / "m"), config_dir=str(tmp_path / "d"),
                                              retention_days=2 / DAY))
    ids = await make_items(client, time.time())
    deadline = time.monotonic() + 10
    while await status(client, f"/v1/files/{ids['old_file']}") != 404 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await status(client, f"/v1/files/{ids['old_file']}") == 404
    assert await status(client, "/v1/responses/resp_old") == 404
