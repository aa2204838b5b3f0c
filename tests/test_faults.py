"""Broken model files get a clear error while the server keeps serving; no paths or traces leak."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from conftest import write_model_yaml
from localai_aio.config import ServerSettings
from tiny_models import write_standin_embedder

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def broken_ggufs(good: bytes) -> dict[str, bytes]:
    """Truncated at many points (header, metadata, tensor infos, tensor data) and random bytes."""
    cuts = [4, 16, 100, 1000, 5000, len(good) // 4, len(good) // 2, len(good) - 1000, len(good) - 1]
    variants = {f"cut{c}": good[:c] for c in cuts}
    variants["random"] = os.urandom(20_000)
    variants["empty"] = b""
    return variants


@pytest.fixture
async def broken_client(make_client, tmp_path: Path, tiny_gguf: Path):  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    good = tiny_gguf.read_bytes()
    (models / "good.gguf").write_bytes(good)
    write_model_yaml(models, "good", context_size=128, parameters={"model": "good.gguf"})
    names = []
    for label, data in broken_ggufs(good).items():
        (models / f"{label}.gguf").write_bytes(data)
        for backend in ("llama-cpp", "ctransformers"):
            name = f"{label}-{backend}"
            write_model_yaml(models, name, backend=backend, parameters={"model": f"{label}.gguf"})
            names.append(name)
    (models / "bad-onnx").mkdir()
    (models / "bad-onnx" / "model.onnx").write_bytes(os.urandom(5000))
    write_standin_embedder(models / "cut-onnx")
    onnx_bytes = (models / "cut-onnx" / "model.onnx").read_bytes()
    (models / "cut-onnx" / "model.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    (models / "bad-onnx" / "tokenizer.json").write_bytes((models / "cut-onnx" / "tokenizer.json").read_bytes())
    write_model_yaml(models, "bad-onnx", backend="onnx-embeddings", parameters={"model": "bad-onnx"})
    write_model_yaml(models, "cut-onnx", backend="onnx-embeddings", parameters={"model": "cut-onnx"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    return client, names, tmp_path


@pytest.mark.llama
@pytest.mark.ctransformers
async def test_broken_gguf_files_are_refused_and_the_server_keeps_serving(broken_client) -> None:  # noqa: ANN001
    client, names, tmp_path = broken_client
    for name in names:
        resp = await client.post(CHAT, json={"model": name, "messages": HI, "max_tokens": 1})
        assert resp.status == 500, name
        text = await resp.text()
        err = (await resp.json())["error"]
        assert err["code"] == "model_load_failed" and err["param"] == "model", name
        assert f"Model '{name}' cannot be loaded" in err["message"], err
        assert "GGUF" in err["message"] or "does not exist" in err["message"], err
        assert str(tmp_path) not in text and "Traceback" not in text
        ok = await client.post(CHAT, json={"model": "good", "messages": HI, "max_tokens": 2, "temperature": 0})
        assert ok.status == 200, name
    assert (await (await client.post(CHAT, json={"model": "good", "messages": HI, "max_tokens": 2,
                                                 "temperature": 0})).json())["choices"][0]["message"]["content"] \
        == " Hello world"


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
async def test_broken_onnx_files_are_refused(broken_client) -> None:  # noqa: ANN001
    client, _, tmp_path = broken_client
    for name in ("bad-onnx", "cut-onnx"):
        resp = await client.post("/v1/embeddings", json={"model": name, "input": "a"})
        assert resp.status == 500
        text = await resp.text()
        err = (await resp.json())["error"]
        assert err["code"] == "model_load_failed" and "ONNX Runtime could not load model.onnx" in err["message"]
        assert str(tmp_path) not in text
    assert (await client.get("/healthz")).status == 200


async def test_model_names_cannot_traverse(client) -> None:  # noqa: ANN001
    for name in ("../models/tiny.gguf", "/etc/passwd", "..", "tiny.gguf/../../x"):
        resp = await client.post(CHAT, json={"model": name, "messages": HI})
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
async def test_unreadable_model_json_names_the_file_not_its_path(make_client, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """An OSError's text carries the full path (as a non-root server meets a file it may not read)."""
    models = tmp_path / "models"
    write_standin_embedder(models / "locked")
    write_model_yaml(models, "locked", backend="onnx-embeddings", parameters={"model": "locked"})
    locked = (models / "locked" / "config.json").resolve()
    locked.write_text("{}")
    read_text = Path.read_text

    def refuse(self: Path, *args, **kwargs) -> str:  # noqa: ANN002, ANN003
        if self.resolve() == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    resp = await client.post("/v1/embeddings", json={"model": "locked", "input": "a"})
    assert resp.status == 500
    err = (await resp.json())["error"]
    assert err["code"] == "model_load_failed"
    assert err["message"] == "Model 'locked' cannot be loaded: cannot read config.json: [Errno 13] Permission " \
        "denied: 'config.json'"
