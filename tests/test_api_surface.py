"""The API surface before any model runs: errors, auth, CORS, models list, OpenAPI, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web

from localai_aio.app import create_app
from localai_aio.config import ServerSettings
from localai_aio.server.middlewares import PUBLIC_PATHS, PUBLIC_PREFIXES

CHAT = "/v1/chat/completions"


def error_of(body: dict) -> dict:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_models_list_shape(client) -> None:  # noqa: ANN001
    for path in ("/v1/models", "/models"):
        resp = await client.get(path)
        assert resp.status == 200
        body = await resp.json()
        assert body["object"] == "list"
        assert sorted(m["id"] for m in body["data"]) == ["tiny-ct", "tiny-llama"]  # the file is claimed by both
        for m in body["data"]:
            assert set(m) == {"id", "object", "created", "owned_by"}
            assert m["object"] == "model" and isinstance(m["created"], int) and m["created"] > 0


async def test_models_list_includes_aliases(make_client, tmp_path: Path, tiny_gguf: Path) -> None:  # noqa: ANN001
    models = tmp_path / "m"
    models.mkdir()
    (models / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    (models / "t.yaml").write_text("name: chat\nparameters: {model: t.gguf}\naliases: [gpt-4, gpt-4o]\n")
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d")))
    ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert ids == ["chat", "gpt-4", "gpt-4o"]
    listed = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    for name in ("chat", "gpt-4"):  # an alias answers as itself, with the model it names as root
        for prefix in ("/v1", ""):
            resp = await client.get(f"{prefix}/models/{name}")
            assert resp.status == 200
            assert await resp.json() == {**listed[name], "root": "chat"}
    missing = await client.get("/v1/models/nope")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "model_not_found"


async def test_unknown_route_and_wrong_method(client) -> None:  # noqa: ANN001
    resp = await client.get("/v1/nothing")
    assert resp.status == 404
    assert error_of(await resp.json())["code"] == "not_found"
    resp = await client.get(CHAT)
    assert resp.status == 405
    err = error_of(await resp.json())
    assert err["code"] == "method_not_allowed" and "POST" in err["message"]
    assert "POST" in resp.headers["Allow"]


async def test_malformed_json(client) -> None:  # noqa: ANN001
    resp = await client.post(CHAT, data=b'{"model": ', headers={"Content-Type": "application/json"})
    assert resp.status == 400
    err = error_of(await resp.json())
    assert err["type"] == "invalid_request_error" and "not valid JSON" in err["message"]


async def test_json_must_be_an_object(client) -> None:  # noqa: ANN001
    resp = await client.post(CHAT, json=[1, 2])
    assert resp.status == 400
    assert "JSON object" in error_of(await resp.json())["message"]


async def test_non_json_content_type(client) -> None:  # noqa: ANN001
    resp = await client.post(CHAT, data="model=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 415
    assert error_of(await resp.json())["code"] == "unsupported_media_type"


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"model": "tiny-llama"}, "messages", "Missing data for required field"),
    ({"model": "tiny-llama", "messages": [], "temperature": "0.7"}, "temperature", "Not a valid number"),
    ({"model": "tiny-llama", "messages": [], "stream": "yes"}, "stream", "Not a valid boolean"),
    ({"model": "tiny-llama", "messages": [], "max_tokens": 1.5}, "max_tokens", "Not a valid integer"),
    ({"model": "tiny-llama", "messages": [], "n": True}, "n", "Not a valid integer"),
    ({"model": 7, "messages": []}, "model", "Not a valid string"),
    ({"model": "tiny-llama", "messages": [{"role": "user", "content": 5}]}, "messages.0.content", "Must be"),
    ({"model": "tiny-llama", "messages": "hi"}, "messages", "Not a valid list"),
])
async def test_validation_errors_name_the_field(client, body: dict, param: str, fragment: str) -> None:  # noqa: ANN001
    resp = await client.post(CHAT, json=body)
    assert resp.status == 400
    err = error_of(await resp.json())
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert fragment in err["message"] and param in err["message"]


async def test_spec_required_file_does_not_apply_to_chat(client) -> None:  # noqa: ANN001
    # The seed spec marks `file` required on OpenAIRequest; a chat request without it must pass validation
    # (and here fail later only because the model does not exist).
    resp = await client.post(CHAT, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 404


async def test_unknown_model(client) -> None:  # noqa: ANN001
    resp = await client.post(CHAT, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 404
    err = error_of(await resp.json())
    assert err == {"message": "The model 'nope' does not exist", "type": "invalid_request_error",
                   "param": "model", "code": "model_not_found"}


async def test_body_over_upload_limit(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    client = await make_client(ServerSettings(models_path=str(tmp_path), config_dir=str(tmp_path / "d"),
                                              upload_limit=0.001))
    big = {"model": "x", "messages": [{"role": "user", "content": "a" * 4000}]}
    resp = await client.post(CHAT, json=big)
    assert resp.status == 413
    err = error_of(await resp.json())
    assert err["code"] == "request_too_large" and "0.001 MB" in err["message"]

    async def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(8):
            yield b"a" * 1000

    resp = await client.post(CHAT, data=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status == 413
    # the server keeps serving
    assert (await client.get("/healthz")).status == 200


async def test_unexpected_exception_is_500_without_details(make_client, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    app = create_app(ServerSettings(models_path=str(tmp_path), config_dir=str(tmp_path / "d")))

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError(f"secret detail in {tmp_path}")

    app.router.add_get("/v1/broken", broken)
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/v1/broken", headers={"X-Request-ID": "req-42"})
        assert resp.status == 500
        text = await resp.text()
        err = error_of(json.loads(text))
        assert err["type"] == "server_error" and "req-42" in err["message"]
        assert "secret" not in text and str(tmp_path) not in text and "Traceback" not in text
        assert resp.headers["X-Request-ID"] == "req-42"
        assert (await client.get("/healthz")).status == 200
    assert "secret detail" in caplog.text and "req-42" in caplog.text


# -- auth ---------------------------------------------------------------------------------------------------

@pytest.fixture
async def keyed(make_client, tmp_path: Path, models_dir: Path):  # noqa: ANN001
    return await make_client(ServerSettings(models_path=str(models_dir), config_dir=str(tmp_path / "d"),
                                            api_keys=("k1", "k2")))


async def test_auth_required_when_keys_set(keyed) -> None:  # noqa: ANN001
    resp = await keyed.get("/v1/models")
    assert resp.status == 401
    err = error_of(await resp.json())
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    resp = await keyed.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401
    for headers in ({"Authorization": "Bearer k1"}, {"Authorization": "bearer k2"}, {"x-api-key": "k1"},
                    {"xi-api-key": "k2"}):
        assert (await keyed.get("/v1/models", headers=headers)).status == 200, headers


async def test_public_paths_need_no_key(keyed) -> None:  # noqa: ANN001
    for path in ("/healthz", "/readyz", "/swagger.json", "/swagger/"):
        assert (await keyed.get(path)).status == 200, path
    assert (await keyed.get("/metrics")).status == 401


async def test_every_non_public_route_requires_a_key(keyed) -> None:  # noqa: ANN001
    """Walk the router: every route outside the public list answers 401 without a key."""
    checked = 0
    for route in keyed.server.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if not path or route.method in ("HEAD", "OPTIONS"):
            continue
        path = path.replace("{voice_id}", "v").replace("{", "").replace("}", "")
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES) or path + "/" in PUBLIC_PREFIXES:
            continue
        method = "GET" if route.method == "*" else route.method
        resp = await keyed.request(method, path, json={})
        assert resp.status == 401, (method, path, resp.status)
        checked += 1
    assert checked >= 6


async def test_open_when_no_keys(client) -> None:  # noqa: ANN001
    assert (await client.get("/v1/models")).status == 200


async def test_cors(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    client = await make_client(ServerSettings(models_path=str(tmp_path), config_dir=str(tmp_path / "d"),
                                              cors=True, cors_allow_origins=("http://ui.local",),
                                              api_keys=("k",)))
    resp = await client.options("/v1/models", headers={"Origin": "http://ui.local",
                                                      "Access-Control-Request-Method": "GET",
                                                      "Access-Control-Request-Headers": "authorization"})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.local"
    resp = await client.get("/v1/models", headers={"Origin": "http://ui.local", "Authorization": "Bearer k"})
    assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.local"
    resp = await client.get("/v1/models", headers={"Origin": "http://evil.local", "Authorization": "Bearer k"})
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_no_cors_headers_by_default(client) -> None:  # noqa: ANN001
    resp = await client.get("/v1/models", headers={"Origin": "http://ui.local"})
    assert "Access-Control-Allow-Origin" not in resp.headers


# -- OpenAPI, health, metrics --------------------------------------------------------------------------------

async def test_swagger_document_lists_every_route(client) -> None:  # noqa: ANN001
    resp = await client.get("/swagger.json")
    assert resp.status == 200
    spec = await resp.json()
    assert spec["openapi"] == "3.0.3"
    paths = spec["paths"]
    for path, method in [("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models", "get"),
                         ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")]:
        assert method in paths[path], path
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["required"] is True
    body, model = chat["requestBody"]["content"]["application/json"]["schema"]["allOf"]
    assert model["properties"]["model"]["enum"] == ["tiny-ct", "tiny-llama"]  # the chat models, nothing else
    schema = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    assert schema["required"] == ["messages"]
    assert schema["properties"]["temperature"] == {"type": "number", "minimum": 0, "maximum": 2}
    assert schema["properties"]["messages"]["minItems"] == 1
    assert "file" in schema["properties"]
    message = spec["components"]["schemas"]["schema.Message"]["properties"]
    assert message["role"]["enum"] == ["assistant", "developer", "function", "system", "tool", "user"]
    assert {"type": "string", "minLength": 1} in schema["properties"]["prompt"]["anyOf"]
    answer = chat["responses"]["200"]["content"]
    assert answer["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert "text/event-stream" in answer
    assert chat["responses"]["default"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}
    upload = paths["/v1/files"]["post"]
    assert upload["responses"]["200"]["links"]["RetrieveFile"] == {
        "operationRef": "#/paths/~1v1~1files~1{file_id}/get", "parameters": {"file_id": "$response.body#/id"}}
    for operation in (op for item in paths.values() for op in item.values()):
        assert "x-model-use-case" not in operation and "produces" not in operation and "consumes" not in operation


async def test_swagger_ui_works_offline(client) -> None:  # noqa: ANN001
    resp = await client.get("/swagger/")
    assert resp.status == 200
    html = await resp.text()
    assert "swagger-ui" in html and "/swagger.json" in html
    assert "http://" not in html and "https://" not in html.replace("https://github.com", "")
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        resp = await client.get(f"/swagger/static/{asset}")
        assert resp.status == 200, asset
        assert len(await resp.read()) > 10_000


async def test_health_and_ready(client) -> None:  # noqa: ANN001
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    body = await (await client.get("/readyz")).json()
    assert body["status"] == "ready" and body["loaded"] == []


async def test_metrics_count_requests_by_route_and_status(client) -> None:  # noqa: ANN001
    await client.get("/v1/models")
    await client.get("/v1/models")
    await client.post(CHAT, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'localai_http_requests_total{method="GET",route="/v1/models",status="200"} 2.0' in text
    assert 'localai_http_requests_total{method="POST",route="/v1/chat/completions",status="404"} 1.0' in text
    assert "localai_http_request_duration_seconds_bucket" in text
    assert "localai_loaded_models 0.0" in text


async def test_request_id_is_echoed_and_logged(client, caplog) -> None:  # noqa: ANN001
    import logging

    with caplog.at_level(logging.INFO, logger="localai_aio.access"):
        resp = await client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    line = next(r for r in caplog.records if r.name == "localai_aio.access")
    assert "GET /v1/models 200" in line.getMessage() and "rid=abc-123" in line.getMessage()


async def test_a_client_that_leaves_is_logged_as_499(client, caplog) -> None:  # noqa: ANN001
    """A handler cancelled because its client closed the connection is not a server error (nginx's 499)."""
    import asyncio
    import logging

    from aiohttp.test_utils import make_mocked_request

    from localai_aio.server.middlewares import request_log_middleware

    async def cancelled(_request: object) -> None:
        raise asyncio.CancelledError

    request = make_mocked_request("POST", "/v1/chat/completions", app=client.server.app)
    with caplog.at_level(logging.INFO, logger="localai_aio.access"), pytest.raises(asyncio.CancelledError):
        await request_log_middleware(request, cancelled)
    assert "POST /v1/chat/completions 499 " in caplog.text
    metrics = await (await client.get("/metrics")).text()
    assert 'status="499"' in metrics and 'status="500"' not in metrics


@pytest.mark.parametrize("path", ["/audio/speech", "/audio/transcriptions", "/audio/translations",
                                  "/images/generations"])
async def test_localai_paths_without_v1(client, path: str) -> None:  # noqa: ANN001
    """LocalAI's clients call these without /v1: the same routes answer (here: 400 for a missing field,
    where an unknown route would be 404)."""
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("model", "x", content_type="text/plain")  # multipart, without the file
    resp = await (client.post(path, json={}) if "audio/t" not in path else client.post(path, data=form))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error" and error["param"] in ("input", "file", "prompt")
