"""Property-based fuzzing of every route in the served /swagger.json (schemathesis, valid and malformed data)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

if importlib.util.find_spec("schemathesis") is None:  # pragma: no cover - the test extra installs it
    pytest.skip("schemathesis is not installed", allow_module_level=True)

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from conftest import ServerProcess, write_model_yaml

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):  # noqa: ANN201
    root = tmp_path_factory.mktemp("fuzz")
    models = root / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "tiny", context_size=256, parameters={"model": "tiny.gguf"})
    server = ServerProcess(["--models-path", str(models), "--config-dir", str(root / "data"), "--threads", "1",
                            "--upload-limit", "1"], cwd=root)
    server.start(root / "server.log")
    yield server
    assert server.stop() == 0


def operations(url: str) -> list:
    return [result.ok() for result in schemathesis.openapi.from_url(url + "/swagger.json").get_all_operations()]


def check_response(case, server) -> None:  # noqa: ANN001
    response = case.call(base_url=server.url, timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, (case.method, case.path, response.text)
    if response.status_code >= 400 and case.method != "HEAD":  # HEAD answers carry no body
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
        assert "Traceback" not in response.text and "/tmp/" not in response.text


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_survives_generated_requests(fuzz_server, mode: GenerationMode) -> None:  # noqa: ANN001
    ops = operations(fuzz_server.url)
    assert len(ops) >= 20  # every documented route and method
    for op in ops:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:  # noqa: ANN001
            check_response(case, fuzz_server)

        run()
    # and the server still answers
    import urllib.request

    with urllib.request.urlopen(fuzz_server.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200
