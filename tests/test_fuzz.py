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
from tiny_models import write_standin_embedder, write_standin_piper, write_standin_reranker

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):  # noqa: ANN201
    root = tmp_path_factory.mktemp("fuzz")
    models = root / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "tiny", context_size=256, parameters={"model": "tiny.gguf"})
    write_standin_embedder(models / "embedder")
    write_model_yaml(models, "embedder", backend="onnx-embeddings", parameters={"model": "embedder"})
    write_standin_piper(models / "voice.onnx")
    write_model_yaml(models, "voice", backend="piper", parameters={"model": "voice.onnx"})
    write_standin_reranker(models / "reranker")
    write_model_yaml(models, "reranker", backend="onnx-rerank", parameters={"model": "reranker"})
    server = ServerProcess(["--models-path", str(models), "--config-dir", str(root / "data"), "--threads", "1",
                            "--upload-limit", "1"], cwd=root)
    server.start(root / "server.log")
    yield server
    assert server.stop() == 0


def operations(url: str) -> list:
    return [result.ok() for result in schemathesis.openapi.from_url(url + "/swagger.json").get_all_operations()]


def busy(response) -> bool:  # noqa: ANN001
    """The one 5xx a correct server gives: full (its queue, or a model's context cache, e.g. while a
    generated background response runs), said with Retry-After."""
    return response.status_code == 503 and "retry-after" in {name.lower() for name in response.headers}


def check_response(case, server) -> None:  # noqa: ANN001
    response = case.call(base_url=server.url, timeout=60)
    if not busy(response):
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500, (case.method, case.path, response.text)
    if response.status_code >= 400 and case.method != "HEAD":  # HEAD answers carry no body
        body = response.json()
        if case.path.startswith("/v1/messages"):  # Anthropic's routes answer in Anthropic's error shape
            assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}, body
        elif case.path.startswith(("/v1/text-to-speech", "/v1/voices")):  # and ElevenLabs' in its own
            assert set(body) == {"detail"} and set(body["detail"]) == {"status", "message", "param"}, body
        elif case.path.startswith("/api/"):  # and Ollama's in its own
            assert set(body) == {"error"} and isinstance(body["error"], str), body
        else:
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


def accepted_share(op, server) -> tuple[float, dict[int, int]]:  # noqa: ANN001
    """The share of valid generated requests (by the document) that the server accepts."""
    statuses: dict[int, int] = {}

    @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE))
    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:  # noqa: ANN001
        status = case.call(base_url=server.url, timeout=60).status_code
        statuses[status] = statuses.get(status, 0) + 1

    run()
    return sum(n for code, n in statuses.items() if code < 300) / sum(statuses.values()), statuses


def test_the_document_is_as_strict_as_the_server(fuzz_server) -> None:  # noqa: ANN001
    """Requests the document calls valid are served: no operation rejects (nearly) all of them, which is
    what schemathesis reports as "mostly rejected generated data". Some refusals remain by design: a
    document cannot say which token ids a model's vocabulary has, or that ``tool_choice`` needs ``tools``.

    Operations on one stored object (a path id) are reached through links, in the stateful test below;
    uploads of audio and image generation need real media and an image model, which a schema cannot
    describe and this server does not have.
    """
    shares = {}
    for op in operations(fuzz_server.url):
        if op.method.upper() == "HEAD" or "{" in op.path or op.path.removeprefix("/v1") in (
                "/audio/transcriptions", "/audio/translations", "/images/generations"):
            continue
        shares[f"{op.method.upper()} {op.path}"] = accepted_share(op, fuzz_server)
    assert len(shares) >= 15
    rejected = {name: statuses for name, (share, statuses) in shares.items() if share < 0.1}
    assert not rejected, rejected


def test_links_lead_from_created_objects_to_their_routes(fuzz_server) -> None:  # noqa: ANN001
    """schemathesis' stateful phase: create an assistant or a file, then follow the document's links
    to read, change and delete it."""
    from hypothesis.stateful import run_state_machine_as_test

    # The document's own links only: links schemathesis infers from list answers depend on what earlier
    # tests left in the store, which hypothesis (rightly) calls flaky data generation.
    config = schemathesis.config.SchemathesisConfig.from_dict(
        {"phases": {"stateful": {"inference": {"algorithms": []}}}})
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/swagger.json", config=config)
    followed: dict[tuple[str, str], set[int]] = {}
    base = schema.as_state_machine()

    class Machine(base):  # type: ignore[misc, valid-type]
        def call(self, case, **kwargs):  # noqa: ANN001, ANN003, ANN201
            response = case.call(base_url=fuzz_server.url, timeout=60, **kwargs)
            followed.setdefault((case.method.upper(), case.path), set()).add(response.status_code)
            return response

        def validate_response(self, response, case, **kwargs) -> None:  # noqa: ANN001, ANN003
            assert response.status_code < 500 or busy(response), (case.method, case.path, response.text)

    run_state_machine_as_test(Machine, settings=settings(
        max_examples=100, deadline=None, derandomize=True, database=None, stateful_step_count=8,
        suppress_health_check=list(HealthCheck)))
    reached = {key for key, statuses in followed.items() if any(code < 300 for code in statuses)}
    for key in [("GET", "/v1/assistants/{assistant_id}"), ("DELETE", "/v1/assistants/{assistant_id}"),
                ("GET", "/v1/files/{file_id}")]:
        assert key in reached, (key, followed)
    # a stored response's id, too, only comes from the response that created it
    assert any(path.startswith("/v1/responses/{") for _, path in reached), followed
