"""The gallery's Hugging Face source end to end, against a stand-in Hub reached through HF_ENDPOINT:
a GGUF file, a folder (allow-patterns) for an ONNX model, checksums, a download cut halfway and
resumed, a gated repository and an unreachable Hub. Installs run through the command line, as users
run them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import free_port
from hub_standin import Hub, RunningHub
from localai_aio.config import ServerSettings
from tiny_models import write_standin_embedder, write_tiny_gguf

pytestmark = pytest.mark.skipif(pytest.importorskip("huggingface_hub") is None, reason="huggingface_hub")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("hubfiles")
    gguf = write_tiny_gguf(root / "tiny.gguf").read_bytes()
    folder, _ = write_standin_embedder(root / "embedder")
    embedder = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    # larger than huggingface_hub's 10 MB download chunk, so that a cut leaves bytes to resume from
    big = np.random.default_rng(0).bytes(24 << 20)
    return {"gguf": gguf, "big": big, **{f"embedder/{k}": v for k, v in embedder.items()}}


@pytest.fixture
def hub(files: dict[str, bytes]):  # noqa: ANN201
    embedder = {k.split("/", 1)[1]: v for k, v in files.items() if k.startswith("embedder/")}
    embedder["README.md"] = b"# not wanted by the allow patterns\n"
    stand_in = Hub(repos={"org/tiny-GGUF": {"tiny.Q8_0.gguf": files["gguf"]},
                          "org/flaky-GGUF": {"big.gguf": files["big"]},
                          "org/gated-GGUF": {"tiny.gguf": files["gguf"]},
                          "org/embedder-onnx": embedder},
                   gated={"org/gated-GGUF"}, flaky={("org/flaky-GGUF", "big.gguf")})
    with RunningHub(stand_in) as running:
        yield running


def gallery(path: Path, files: dict[str, bytes]) -> Path:
    def gguf(repo: str, file: str, digest: str) -> dict:
        return {"description": f"{repo} (test)",
                "files": [{"path": "model.gguf", "sha256": digest,
                           "source": {"hf": repo, "file": file, "revision": "main"}}],
                "config": {"backend": "llama-cpp", "context_size": 256, "parameters": {"model": "model.gguf"}}}

    entries = {
        "tiny": gguf("org/tiny-GGUF", "tiny.Q8_0.gguf", sha(files["gguf"])),
        "wrong-hash": gguf("org/tiny-GGUF", "tiny.Q8_0.gguf", "0" * 64),
        "flaky": gguf("org/flaky-GGUF", "big.gguf", sha(files["big"])),
        "gated": gguf("org/gated-GGUF", "tiny.gguf", sha(files["gguf"])),
        "missing": gguf("org/tiny-GGUF", "no-such-file.gguf", sha(files["gguf"])),
        "embedder": {"description": "stand-in embedder (test)",
                     "files": [{"path": "onnx",
                                "sha256": {"model.onnx": sha(files["embedder/model.onnx"]),
                                           "tokenizer.json": sha(files["embedder/tokenizer.json"])},
                                "source": {"hf": "org/embedder-onnx", "allow": ["*.onnx", "*.json"]}}],
                     "config": {"backend": "onnx-embeddings", "parameters": {"model": "onnx"}}},
    }
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


def install(tmp_path: Path, files: dict[str, bytes], name: str, endpoint: str,
            token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "localai_aio", "models", "install", name, "--gallery",
                           str(gallery(tmp_path / "gallery.yaml", files)), "--models-path", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def nothing_left(models: Path, name: str) -> bool:
    return not (models / f"{name}.yaml").exists() and not (models / name).exists() \
        and not any(p.name.startswith(".install-") for p in models.iterdir())


def test_gguf_from_the_hub(hub: Hub, files: dict[str, bytes], tmp_path: Path) -> None:
    done = install(tmp_path, files, "tiny", hub.url)
    assert done.returncode == 0, done.stderr
    models = tmp_path / "models"
    assert (models / "tiny" / "model.gguf").read_bytes() == files["gguf"]
    assert yaml.safe_load((models / "tiny.yaml").read_text())["parameters"]["model"] == "tiny/model.gguf"
    asked = [(m, p) for m, p, _ in hub.requests]
    assert ("HEAD", "/org/tiny-GGUF/resolve/main/tiny.Q8_0.gguf") in asked  # metadata, then the CDN
    assert ("GET", "/cdn/org/tiny-GGUF/tiny.Q8_0.gguf") in asked


async def test_folder_from_the_hub_serves_embeddings(hub: Hub, files: dict[str, bytes], tmp_path: Path,
                                                     make_client) -> None:  # noqa: ANN001
    done = install(tmp_path, files, "embedder", hub.url)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "models" / "embedder" / "onnx"
    wanted = sorted(k.split("/", 1)[1] for k in files if k.startswith("embedder/") and k.endswith((".onnx", ".json")))
    assert sorted(p.name for p in folder.iterdir()) == wanted  # what the patterns allow: no README, no vocab.txt
    client = await make_client(ServerSettings(models_path=str(tmp_path / "models"),
                                              config_dir=str(tmp_path / "d"), watch_models=False))
    body = await (await client.post("/v1/embeddings", json={"model": "embedder", "input": "the cat"})).json()
    assert len(body["data"][0]["embedding"]) == 8


def test_a_wrong_checksum_refuses_the_install(hub: Hub, files: dict[str, bytes], tmp_path: Path) -> None:
    done = install(tmp_path, files, "wrong-hash", hub.url)
    assert done.returncode != 0 and "checksum mismatch for model.gguf" in done.stderr
    assert "Traceback" not in done.stderr and nothing_left(tmp_path / "models", "wrong-hash")


def test_a_download_cut_halfway_is_resumed(hub: Hub, files: dict[str, bytes], tmp_path: Path) -> None:
    done = install(tmp_path, files, "flaky", hub.url)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "flaky" / "model.gguf").read_bytes() == files["big"]
    ranges = [h.get("Range") for m, p, h in hub.requests if p == "/cdn/org/flaky-GGUF/big.gguf"]
    assert len(ranges) == 2 and ranges[0] is None  # cut, then asked again for the rest only
    assert ranges[1].startswith("bytes=") and 0 < int(ranges[1][6:-1]) <= len(files["big"]) // 2


def test_gated_repositories_need_hf_token(hub: Hub, files: dict[str, bytes], tmp_path: Path) -> None:
    refused = install(tmp_path, files, "gated", hub.url)
    assert refused.returncode != 0 and "gated" in refused.stderr and "HF_TOKEN" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and nothing_left(tmp_path / "models", "gated")
    done = install(tmp_path, files, "gated", hub.url, token=hub.token)
    assert done.returncode == 0, done.stderr
    assert any(h.get("Authorization") == f"Bearer {hub.token}" for _, _, h in hub.requests)


def test_a_missing_file_says_so(hub: Hub, files: dict[str, bytes], tmp_path: Path) -> None:
    done = install(tmp_path, files, "missing", hub.url)
    assert done.returncode != 0 and "is not on the Hub" in done.stderr


def test_an_unreachable_hub_is_a_clear_error(files: dict[str, bytes], tmp_path: Path) -> None:
    done = install(tmp_path, files, "tiny", f"http://127.0.0.1:{free_port()}")
    assert done.returncode != 0 and "unreachable" in done.stderr and "HF_ENDPOINT" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and nothing_left(tmp_path / "models", "tiny")
