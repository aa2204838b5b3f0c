"""Safe by default: the Host allowlist without keys, the Origin check on state-changing requests, admin and
user keys, and each key's assistants, files and stored responses kept to itself (on SQLite and on a real
PostgreSQL server)."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest

from conftest import write_model_yaml
from localai_aio.cli import build_parser
from localai_aio.config import ServerSettings, load_settings
from localai_aio.principal import OPEN, Principal, key_hash
from localai_aio.server import keys
from localai_aio.server.access import AccessPolicy

ADMIN, USER_A, USER_B = "root-key", "usera", "userb"
EVIL = "http://attacker.example"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(body: dict) -> dict:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def refused(resp: aiohttp.ClientResponse, code: str) -> str:
    """A 403 in OpenAI's shape with ``code``; returns its message."""
    assert resp.status == 403, await resp.text()
    err = error_of(await resp.json())
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", code, None)
    return err["message"]


async def upload(client, key: str | None = None, data: bytes = b"hello", **headers: str):  # noqa: ANN001, ANN201
    form = aiohttp.FormData()
    form.add_field("purpose", "assistants")
    form.add_field("file", data, filename="notes.txt", content_type="text/plain")
    return await client.post("/v1/files", data=form, headers={**(bearer(key) if key else {}), **headers})


@pytest.fixture
def make(make_client, models_dir: Path, tmp_path: Path):  # noqa: ANN001, ANN201
    """A client for the tiny models with these settings."""
    async def build(**changes: object):  # noqa: ANN202
        return await make_client(ServerSettings(models_path=str(models_dir), config_dir=str(tmp_path / "d"),
                                                watch_models=False, **changes))

    return build


# -- Host --------------------------------------------------------------------------------------------------

async def test_a_foreign_host_is_refused_without_keys(make) -> None:  # noqa: ANN001
    client = await make()
    for host in ("attacker.example", "attacker.example:8080", "127.0.0.1.attacker.example", "localhost.evil"):
        message = await refused(await client.get("/v1/models", headers={"Host": host}), "host_not_allowed")
        assert f"Host '{host.partition(':')[0]}' is not served" in message
        assert "--allowed-hosts" in message and "LOCALAI_ALLOWED_HOSTS" in message
    # not only reads: nothing behind the check runs
    await refused(await client.post("/models/reload", headers={"Host": "attacker.example"}), "host_not_allowed")
    assert (await client.get("/v1/models")).status == 200  # the test client's Host: 127.0.0.1:PORT


async def test_local_names_are_served_whatever_the_port(make) -> None:  # noqa: ANN001
    client = await make()
    for host in ("localhost", "LOCALHOST:1234", "localhost.", "127.0.0.1", "127.0.0.1:80", "127.1.2.3:9",
                 "[::1]", "[::1]:8080"):
        assert (await client.get("/v1/models", headers={"Host": host})).status == 200, host


async def test_allowed_hosts_address_and_base_url_are_served(make) -> None:  # noqa: ANN001
    client = await make(allowed_hosts=("ai.example.org", "Other.Example:9000"), address="10.1.2.3:8080",
                        base_url="https://public.example.net/prefix")
    for host in ("ai.example.org", "ai.example.org:443", "other.example", "10.1.2.3:8080", "public.example.net"):
        assert (await client.get("/v1/models", headers={"Host": host})).status == 200, host
    message = await refused(await client.get("/v1/models", headers={"Host": "sub.ai.example.org"}),
                            "host_not_allowed")
    assert "ai.example.org" in message and "every interface" not in message


async def test_star_serves_every_host(make) -> None:  # noqa: ANN001
    client = await make(allowed_hosts=("*",))
    assert (await client.get("/v1/models", headers={"Host": "attacker.example"})).status == 200


async def test_listening_everywhere_still_checks_the_host(make) -> None:  # noqa: ANN001
    client = await make(address="0.0.0.0:8080")
    message = await refused(await client.get("/v1/models", headers={"Host": "192.168.1.20:8080"}),
                            "host_not_allowed")
    assert "listens on every interface" in message and "--allowed-hosts" in message
    await refused(await client.get("/v1/models", headers={"Host": "0.0.0.0:8080"}), "host_not_allowed")
    assert (await client.get("/v1/models", headers={"Host": "localhost:8080"})).status == 200


async def test_health_probes_answer_any_host(make) -> None:  # noqa: ANN001
    client = await make()
    for path in ("/healthz", "/readyz"):
        assert (await client.get(path, headers={"Host": "10.244.1.7:8080"})).status == 200, path
    await refused(await client.get("/swagger.json", headers={"Host": "10.244.1.7:8080"}), "host_not_allowed")


async def test_with_keys_the_host_is_not_checked(make) -> None:  # noqa: ANN001
    client = await make(api_keys=(USER_A,))
    resp = await client.get("/v1/models", headers={"Host": "ai.example.org", **bearer(USER_A)})
    assert resp.status == 200
    assert (await client.get("/v1/models", headers={"Host": "ai.example.org"})).status == 401


# -- Origin ------------------------------------------------------------------------------------------------

async def test_a_cross_site_post_is_refused(make) -> None:  # noqa: ANN001
    client = await make()
    message = await refused(await client.post("/models/reload", headers={"Origin": EVIL}), "origin_not_allowed")
    assert EVIL in message and "--cors-allow-origins" in message and "--base-url" in message
    await refused(await upload(client, Origin=EVIL), "origin_not_allowed")
    await refused(await client.delete("/v1/files/file-x", headers={"Origin": EVIL}), "origin_not_allowed")
    await refused(await client.post("/v1/assistants", json={"model": "tiny-llama"}, headers={"Origin": "null"}),
                  "origin_not_allowed")
    assert (await (await client.get("/v1/files")).json())["data"] == []  # the refused upload stored nothing
    # reading is not changing: a GET goes on (the browser keeps the answer from the page without CORS)
    assert (await client.get("/v1/models", headers={"Origin": EVIL})).status == 200


async def test_same_origin_and_originless_requests_pass(make) -> None:  # noqa: ANN001
    client = await make()
    own = f"http://127.0.0.1:{client.port}"
    assert (await client.post("/models/reload", headers={"Origin": own})).status == 200
    assert (await client.post("/models/reload")).status == 200  # curl, the SDKs
    assert (await upload(client, Origin=own)).status == 200
    # the page's own origin on another port is another origin
    await refused(await client.post("/models/reload", headers={"Origin": f"http://127.0.0.1:{client.port + 1}"}),
                  "origin_not_allowed")
    # behind a proxy: the origin it forwarded for, or the configured public URL
    forwarded = {"Origin": "https://ai.example.org", "X-Forwarded-Host": "ai.example.org"}
    assert (await client.post("/models/reload", headers=forwarded)).status == 200


async def test_base_url_is_the_servers_own_origin(make) -> None:  # noqa: ANN001
    client = await make(base_url="https://ai.example.org")
    assert (await client.post("/models/reload", headers={"Origin": "https://ai.example.org"})).status == 200
    await refused(await client.post("/models/reload", headers={"Origin": "http://ai.example.org"}),
                  "origin_not_allowed")


async def test_cors_allow_origins_names_the_sites_that_may(make) -> None:  # noqa: ANN001
    client = await make(cors_allow_origins=("https://ui.example.com",))
    resp = await client.post("/models/reload", headers={"Origin": "https://ui.example.com"})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://ui.example.com"  # naming it turns CORS on
    assert (await upload(client, Origin="https://ui.example.com:443")).status == 200
    await refused(await client.post("/models/reload", headers={"Origin": EVIL}), "origin_not_allowed")


async def test_cors_without_origins_allows_any_site_as_before(make) -> None:  # noqa: ANN001
    client = await make(cors=True)
    assert (await client.post("/models/reload", headers={"Origin": EVIL})).status == 200


async def test_the_origin_is_checked_with_keys_too(make) -> None:  # noqa: ANN001
    client = await make(api_keys=(USER_A,))
    await refused(await client.post("/models/reload", headers={"Origin": EVIL, **bearer(USER_A)}),
                  "origin_not_allowed")
    assert (await client.post("/models/reload", headers=bearer(USER_A))).status == 200


# -- admin and user keys -------------------------------------------------------------------------------------

ADMIN_ROUTES = [("POST", "/models/reload", None), ("GET", "/metrics", None), ("POST", "/models/apply", {"id": "x"}),
                ("GET", "/models/jobs", None), ("GET", "/models/jobs/some-uuid", None)]


@pytest.fixture
async def roles(make):  # noqa: ANN001, ANN201
    return await make(api_keys=(USER_A, USER_B), admin_api_keys=(ADMIN,))


async def test_user_keys_cannot_change_models_or_read_metrics(roles) -> None:  # noqa: ANN001
    for method, path, body in ADMIN_ROUTES:
        message = await refused(await roles.request(method, path, json=body, headers=bearer(USER_A)),
                                "insufficient_permissions")
        assert message == f"{method} {path} needs an admin key (one of --admin-api-keys); this key is a user key"
    # what users may do
    for path in ("/v1/models", "/ui/api/models", "/models/available"):
        assert (await roles.get(path, headers=bearer(USER_B))).status == 200, path


async def test_admin_keys_may(roles) -> None:  # noqa: ANN001
    assert (await roles.post("/models/reload", headers=bearer(ADMIN))).status == 200
    metrics = await roles.get("/metrics", headers=bearer(ADMIN))
    assert metrics.status == 200 and "localai_http_requests_total" in await metrics.text()
    assert (await roles.get("/models/jobs", headers=bearer(ADMIN))).status == 200
    resp = await roles.post("/models/apply", json={"id": "no-such-entry"}, headers=bearer(ADMIN))
    assert resp.status == 404  # past the check: the gallery has no such entry
    assert (await roles.get("/v1/models", headers=bearer("wrong"))).status == 401
    assert (await roles.post("/models/reload")).status == 401


async def test_only_api_keys_are_all_admins_as_before(make) -> None:  # noqa: ANN001
    client = await make(api_keys=(USER_A, USER_B))
    for key in (USER_A, USER_B):
        assert (await client.post("/models/reload", headers=bearer(key))).status == 200
        assert (await client.get("/metrics", headers=bearer(key))).status == 200


async def test_without_keys_everything_is_open_to_local_clients(make) -> None:  # noqa: ANN001
    client = await make()
    assert (await client.get("/metrics")).status == 200
    assert (await client.post("/models/reload")).status == 200


async def test_keys_name_principals(roles) -> None:  # noqa: ANN001
    policy: AccessPolicy = roles.server.app[keys.ACCESS]
    assert policy.identify(USER_A) == Principal(key_hash(USER_A), admin=False)
    assert policy.identify(ADMIN) == Principal(key_hash(ADMIN), admin=True)
    assert policy.identify("nope") is None and policy.identify(None) is None
    assert len(key_hash(USER_A)) == 64 and USER_A not in key_hash(USER_A)
    # what the engines may partition cached prompts by: a user's own scope, one shared scope for admins
    assert Principal(key_hash(USER_A), admin=False).cache_scope == key_hash(USER_A)
    assert Principal(key_hash(ADMIN), admin=True).cache_scope == "" == OPEN.cache_scope


def test_settings_from_flags_and_environment() -> None:
    args = build_parser().parse_args(["serve", "--admin-api-keys", "a1,a2", "--allowed-hosts", "ai.example.org,b",
                                      "--cors-allow-origins", "https://ui.example.com"])
    s = load_settings({k: v for k, v in vars(args).items() if k not in {"command", "func"}}, environ={})
    assert s.admin_api_keys == ("a1", "a2") and s.allowed_hosts == ("ai.example.org", "b")
    assert s.cross_origins == ("https://ui.example.com",)
    s = load_settings({}, {"LOCALAI_ADMIN_API_KEYS": "x", "LOCALAI_ALLOWED_HOSTS": "h"})
    assert (s.admin_api_keys, s.allowed_hosts) == (("x",), ("h",))
    assert load_settings({}, {}).cross_origins == ()  # no other site's page by default
    assert load_settings({"cors": True}, {}).cross_origins == ("*",)  # --cors alone: any, as before


# -- each key's data ---------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def owners(make, store_kind: str, request: pytest.FixtureRequest):  # noqa: ANN001, ANN201
    """Two user keys and an admin key, on SQLite or on a real PostgreSQL server."""
    extra = {"database_url": request.getfixturevalue("database_url")} if store_kind == "postgres" else {}
    return await make(api_keys=(USER_A, USER_B), admin_api_keys=(ADMIN,), **extra)


async def ok(resp: aiohttp.ClientResponse) -> dict:
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def not_found(resp: aiohttp.ClientResponse, object_id: str) -> None:
    assert resp.status == 404, await resp.text()
    err = error_of(await resp.json())
    assert err["code"] == "not_found" and object_id in err["message"]


async def test_files_are_their_makers(owners) -> None:  # noqa: ANN001
    mine = await ok(await upload(owners, USER_A, b"a's secret"))
    theirs = await ok(await upload(owners, USER_B, b"b's notes"))
    listed = await ok(await owners.get("/v1/files", headers=bearer(USER_B)))
    assert [f["id"] for f in listed["data"]] == [theirs["id"]]
    # another user's cursor is no cursor: it reveals nothing either
    after = await ok(await owners.get("/v1/files", params={"after": mine["id"], "order": "asc"},
                                      headers=bearer(USER_B)))
    assert [f["id"] for f in after["data"]] == [theirs["id"]]
    for method, path in (("GET", f"/v1/files/{mine['id']}"), ("GET", f"/v1/files/{mine['id']}/content"),
                         ("DELETE", f"/v1/files/{mine['id']}")):
        await not_found(await owners.request(method, path, headers=bearer(USER_B)), mine["id"])
    assert await ok(await owners.get(f"/v1/files/{mine['id']}", headers=bearer(USER_A))) == mine
    content = await owners.get(f"/v1/files/{mine['id']}/content", headers=bearer(USER_A))
    assert await content.read() == b"a's secret"
    every = await ok(await owners.get("/v1/files", headers=bearer(ADMIN)))
    assert [f["id"] for f in every["data"]] == [theirs["id"], mine["id"]]
    content = await owners.get(f"/v1/files/{theirs['id']}/content", headers=bearer(ADMIN))
    assert await content.read() == b"b's notes"
    await ok(await owners.delete(f"/v1/files/{theirs['id']}", headers=bearer(ADMIN)))
    await ok(await owners.delete(f"/v1/files/{mine['id']}", headers=bearer(USER_A)))
    assert (await ok(await owners.get("/v1/files", headers=bearer(ADMIN))))["data"] == []


async def test_assistants_are_their_makers(owners) -> None:  # noqa: ANN001
    a_file = await ok(await upload(owners, USER_A))
    b_file = await ok(await upload(owners, USER_B))
    made = await ok(await owners.post("/v1/assistants", json={"model": "tiny-llama", "name": "a's",
                                                              "file_ids": [a_file["id"]]}, headers=bearer(USER_A)))
    theirs = await ok(await owners.post("/v1/assistants", json={"model": "tiny-llama", "name": "b's"},
                                        headers=bearer(USER_B)))
    listed = await ok(await owners.get("/v1/assistants", headers=bearer(USER_B)))
    assert [a["id"] for a in listed["data"]] == [theirs["id"]]
    aid = made["id"]
    for method, path, body in (("GET", f"/v1/assistants/{aid}", None),
                               ("POST", f"/v1/assistants/{aid}", {"name": "taken"}),
                               ("DELETE", f"/v1/assistants/{aid}", None),
                               ("GET", f"/v1/assistants/{aid}/files", None),
                               ("GET", f"/v1/assistants/{aid}/files/{a_file['id']}", None),
                               ("POST", f"/v1/assistants/{aid}/files", {"file_id": b_file["id"]}),
                               ("DELETE", f"/v1/assistants/{aid}/files/{a_file['id']}", None)):
        await not_found(await owners.request(method, path, json=body, headers=bearer(USER_B)), aid)
    # a user links only files it can see
    for resp in (await owners.post("/v1/assistants", json={"model": "tiny-llama", "file_ids": [a_file["id"]]},
                                   headers=bearer(USER_B)),
                 await owners.post(f"/v1/assistants/{theirs['id']}", json={"file_ids": [a_file["id"]]},
                                   headers=bearer(USER_B)),
                 await owners.post(f"/v1/assistants/{theirs['id']}/files", json={"file_id": a_file["id"]},
                                   headers=bearer(USER_B))):
        await not_found(resp, a_file["id"])
    assert (await ok(await owners.get(f"/v1/assistants/{theirs['id']}", headers=bearer(USER_B))))["file_ids"] == []
    assert await ok(await owners.get(f"/v1/assistants/{aid}", headers=bearer(USER_A))) == made
    every = await ok(await owners.get("/v1/assistants", headers=bearer(ADMIN)))
    assert [a["id"] for a in every["data"]] == [theirs["id"], aid]
    renamed = await ok(await owners.post(f"/v1/assistants/{aid}", json={"name": "by admin"}, headers=bearer(ADMIN)))
    assert renamed["name"] == "by admin" and renamed["file_ids"] == [a_file["id"]]
    await ok(await owners.delete(f"/v1/assistants/{theirs['id']}", headers=bearer(ADMIN)))


def _stored(client, response_id: str, who: Principal) -> None:  # noqa: ANN001
    """A stored response made by ``who``, straight into the app's store."""
    response = {"id": response_id, "object": "response", "created_at": int(time.time()), "status": "completed",
                "background": False, "output": []}
    item = {"id": "msg_1", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": "a secret question"}]}
    client.server.app[keys.STORE].save_response(response, [{"role": "user", "content": "a secret question"}],
                                                [item], who=who)


async def test_stored_responses_are_their_makers(owners) -> None:  # noqa: ANN001
    _stored(owners, "resp_a", Principal(key_hash(USER_A), admin=False))
    _stored(owners, "resp_old", OPEN)  # made before keys were recorded, or without keys
    for rid in ("resp_a", "resp_old"):
        for method, path in (("GET", f"/v1/responses/{rid}"), ("GET", f"/v1/responses/{rid}/input_items"),
                             ("POST", f"/v1/responses/{rid}/cancel"), ("DELETE", f"/v1/responses/{rid}")):
            await not_found(await owners.request(method, path, headers=bearer(USER_B)), rid)
        resp = await owners.post("/v1/responses", json={"model": "tiny-llama", "input": "and then?",
                                                        "previous_response_id": rid}, headers=bearer(USER_B))
        await not_found(resp, rid)
        assert error_of(await resp.json())["param"] == "previous_response_id"
    assert (await ok(await owners.get("/v1/responses/resp_a", headers=bearer(USER_A))))["id"] == "resp_a"
    items = await ok(await owners.get("/v1/responses/resp_a/input_items", headers=bearer(USER_A)))
    assert [i["id"] for i in items["data"]] == ["msg_1"]
    await not_found(await owners.get("/v1/responses/resp_old", headers=bearer(USER_A)), "resp_old")
    for rid in ("resp_a", "resp_old"):
        assert (await ok(await owners.get(f"/v1/responses/{rid}", headers=bearer(ADMIN))))["id"] == rid
    assert (await ok(await owners.delete("/v1/responses/resp_a", headers=bearer(USER_A))))["deleted"] is True


async def test_without_keys_everything_is_shared(make) -> None:  # noqa: ANN001
    client = await make()
    made = await ok(await upload(client))
    assert [f["id"] for f in (await ok(await client.get("/v1/files")))["data"]] == [made["id"]]
    _stored(client, "resp_open", OPEN)
    assert (await ok(await client.get("/v1/responses/resp_open")))["id"] == "resp_open"


@pytest.mark.llama
async def test_a_user_continues_only_its_own_conversation(make_client, tiny_gguf: Path, tmp_path: Path) -> None:  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "tiny", context_size=1024, parameters={"model": "tiny.gguf"})
    write_model_yaml(models, "long", context_size=16384, parameters={"model": "tiny.gguf"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                              api_keys=(USER_A, USER_B), admin_api_keys=(ADMIN,)))
    ask = {"model": "tiny", "input": "Hello", "max_output_tokens": 4, "temperature": 0}
    first = await ok(await client.post("/v1/responses", json=ask, headers=bearer(USER_A)))
    follow = {**ask, "previous_response_id": first["id"]}
    await not_found(await client.post("/v1/responses", json=follow, headers=bearer(USER_B)), first["id"])
    await not_found(await client.get(f"/v1/responses/{first['id']}", headers=bearer(USER_B)), first["id"])
    second = await ok(await client.post("/v1/responses", json=follow, headers=bearer(USER_A)))
    assert second["previous_response_id"] == first["id"]
    assert (await ok(await client.get(f"/v1/responses/{second['id']}", headers=bearer(ADMIN))))["id"] == second["id"]
    # a background response running here cannot be stopped by another key
    running = await ok(await client.post("/v1/responses", json={"model": "long", "input": "Tell a long story",
                                                                 "max_output_tokens": 8000, "background": True},
                                         headers=bearer(USER_A)))
    for method, path in (("POST", f"/v1/responses/{running['id']}/cancel"),
                         ("DELETE", f"/v1/responses/{running['id']}")):
        await not_found(await client.request(method, path, headers=bearer(USER_B)), running["id"])
    status = (await ok(await client.get(f"/v1/responses/{running['id']}", headers=bearer(USER_A))))["status"]
    assert status in ("queued", "in_progress")
    cancelled = await ok(await client.post(f"/v1/responses/{running['id']}/cancel", headers=bearer(USER_A)))
    assert cancelled["status"] == "cancelled"
