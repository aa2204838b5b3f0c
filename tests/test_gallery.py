"""Gallery installs from a wheel the test builds, fetched through pip with --find-links (no network)."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from localai_aio.config import ServerSettings
from localai_aio.gallery import install as gallery_install
from localai_aio.gallery.install import InstallError, install, load_gallery

PAYLOAD = b"part-one:" + bytes(range(256)) * 40 + b":part-two"


def build_wheel(folder: Path, name: str = "tiny_model_pkg", version: str = "1.0.0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    half = len(PAYLOAD) // 2
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}/data/model.bin.part0", PAYLOAD[:half])
        z.writestr(f"{name}/data/model.bin.part1", PAYLOAD[half:])
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return wheel


def write_gallery(path: Path, sha256: str, name: str = "tiny") -> Path:
    path.write_text(yaml.safe_dump({
        "defaults": [name],
        "models": {name: {
            "description": "a test model",
            "files": [{"path": "model.bin", "sha256": sha256, "source": {
                "pypi": "tiny-model-pkg==1.0.0",
                "parts": ["tiny_model_pkg/data/model.bin.part0", "tiny_model_pkg/data/model.bin.part1"]}}],
            "config": {"backend": "llama-cpp", "parameters": {"model": "model.bin", "temperature": 0.1},
                       "aliases": ["gpt-4"]},
        }},
    }))
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    build_wheel(tmp_path / "wheels")
    return tmp_path / "wheels"


def test_install_extracts_joins_checks_and_writes_yaml(tmp_path: Path, wheels: Path) -> None:
    gallery = load_gallery(write_gallery(tmp_path / "g.yaml", hashlib.sha256(PAYLOAD).hexdigest()))
    models = tmp_path / "models"
    assert install(gallery.get("tiny"), models, find_links=[str(wheels)]) is True
    assert (models / "tiny" / "model.bin").read_bytes() == PAYLOAD
    config = yaml.safe_load((models / "tiny.yaml").read_text())
    assert config == {"name": "tiny", "backend": "llama-cpp", "aliases": ["gpt-4"],
                      "parameters": {"model": "tiny/model.bin", "temperature": 0.1}, "installed_by": "gallery"}
    assert sorted(p.name for p in models.iterdir()) == ["tiny", "tiny.yaml"]  # no temporary leftovers
    assert install(gallery.get("tiny"), models, find_links=[str(wheels)]) is False  # idempotent


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path: Path, wheels: Path) -> None:
    gallery = load_gallery(write_gallery(tmp_path / "g.yaml", "0" * 64))
    models = tmp_path / "models"
    with pytest.raises(InstallError, match="checksum mismatch for model.bin"):
        install(gallery.get("tiny"), models, find_links=[str(wheels)])
    assert list(models.iterdir()) == []


def test_interrupted_install_leaves_nothing(tmp_path: Path, wheels: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gallery = load_gallery(write_gallery(tmp_path / "g.yaml", hashlib.sha256(PAYLOAD).hexdigest()))
    models = tmp_path / "models"

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gallery_install, "sha256_of", interrupted)
    with pytest.raises(KeyboardInterrupt):
        install(gallery.get("tiny"), models, find_links=[str(wheels)])
    assert list(models.iterdir()) == []


def test_missing_package_is_a_clear_error(tmp_path: Path) -> None:
    gallery = load_gallery(write_gallery(tmp_path / "g.yaml", "0" * 64))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InstallError, match="could not download tiny-model-pkg==1.0.0"):
        install(gallery.get("tiny"), tmp_path / "models", find_links=[str(tmp_path / "empty")])


async def test_cli_install_then_served_by_models_list(tmp_path: Path, wheels: Path, make_client) -> None:  # noqa: ANN001
    gallery = write_gallery(tmp_path / "g.yaml", hashlib.sha256(PAYLOAD).hexdigest())
    models = tmp_path / "models"
    cmd = [sys.executable, "-m", "localai_aio", "models", "install", "--defaults", "--gallery", str(gallery),
           "--models-path", str(models), "--find-links", str(wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "tiny: installed" in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "tiny: already installed" in again.stdout
    listing = subprocess.run([sys.executable, "-m", "localai_aio", "models", "list", "--gallery", str(gallery),
                              "--models-path", str(models)], capture_output=True, text=True, timeout=60)
    assert listing.stdout.split()[:2] == ["tiny", "installed"]
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d")))
    ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert ids == ["tiny", "gpt-4"]
    removed = subprocess.run([sys.executable, "-m", "localai_aio", "models", "remove", "tiny", "--models-path",
                              str(models)], capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0 and list(models.iterdir()) == []


def test_real_gallery_file_is_consistent() -> None:
    gallery = load_gallery(Path(__file__).parent.parent / "conf" / "gallery.yaml")
    assert gallery.defaults and set(gallery.defaults) <= set(gallery.entries)
    for entry in gallery.entries.values():
        assert entry.size and entry.license, entry.name  # shown by `models list`; the size is checked first
        for f in entry.files:  # every byte is checked: a file's own sha256 (each file's, for a folder), or its wheel's
            digests = f.sha256 if isinstance(f.sha256, dict) else [f.sha256 or f.source.get("wheel_sha256")]
            digests = list(digests.values()) if isinstance(digests, dict) else digests
            assert digests and all(d and len(d) == 64 for d in digests), (entry.name, f.path)
        produced = {f.path for f in entry.files} | {step["to"] for step in entry.post if "to" in step}
        assert entry.config["parameters"]["model"] in produced


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="the export tool chain is not installed")
async def test_models_export_cli_writes_a_served_model(tmp_path: Path, make_client) -> None:  # noqa: ANN001
    from tiny_models import EMBED_VOCAB, export_tiny_bert

    folder = export_tiny_bert(tmp_path / "bert")
    models = tmp_path / "models"
    cmd = [sys.executable, "-m", "localai_aio", "models", "export", str(folder / "source"), "--name", "my-bert",
           "--task", "feature-extraction", "--alias", "text-embedding-3-small", "--models-path", str(models)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in models.iterdir()) == ["my-bert", "my-bert.yaml"]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=60).returncode == 1  # no silent overwrite
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    body = await (await client.post("/v1/embeddings", json={"model": "text-embedding-3-small",
                                                            "input": "the cat"})).json()
    assert len(body["data"][0]["embedding"]) == 32 and len(EMBED_VOCAB) > 10
    bad = subprocess.run([sys.executable, "-m", "localai_aio", "models", "export", str(tmp_path / "nothing"),
                          "--name", "x", "--models-path", str(models)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "export failed" in bad.stderr and not (models / "x.yaml").exists()


@pytest.mark.model
async def test_defaults_install_and_every_alias_answers(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    """`models install --defaults` (idempotent: quick when they are there) then one request per alias."""
    import io

    from conftest import DEFAULT_MODELS

    done = subprocess.run([sys.executable, "-m", "localai_aio", "models", "install", "--defaults", "--models-path",
                           str(DEFAULT_MODELS)], capture_output=True, text=True, timeout=1800,
                          cwd=Path(__file__).parent.parent)
    if done.returncode != 0 and "could not download" in done.stderr:
        pytest.skip(f"PyPI cannot be reached: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    client = await make_client(ServerSettings(models_path=str(DEFAULT_MODELS), config_dir=str(tmp_path / "d")))
    ids = {m["id"] for m in (await (await client.get("/v1/models")).json())["data"]}
    assert {"gpt-4", "gpt-4o", "gpt-4o-mini", "text-embedding-ada-002", "text-embedding-3-small", "whisper-1",
            "tts-1", "tts-1-hd"} <= ids
    for alias in ("gpt-4", "gpt-4o", "gpt-4o-mini"):
        resp = await client.post("/v1/chat/completions", json={"model": alias, "max_tokens": 5,
                                                               "messages": [{"role": "user", "content": "Hi"}]})
        assert resp.status == 200
    for alias in ("text-embedding-ada-002", "text-embedding-3-small"):
        body = await (await client.post("/v1/embeddings", json={"model": alias, "input": "hello"})).json()
        assert len(body["data"][0]["embedding"]) == 384
    for alias in ("tts-1", "tts-1-hd"):
        resp = await client.post("/v1/audio/speech", json={"model": alias, "input": "Hi there.", "voice": "alloy",
                                                           "response_format": "wav"})
        assert resp.status == 200
        speech = await resp.read()
        assert speech[:4] == b"RIFF"
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("file", io.BytesIO(speech), filename="a.wav")
    form.add_field("model", "whisper-1")
    resp = await client.post("/v1/audio/transcriptions", data=form)
    assert resp.status == 200 and "hi" in (await resp.json())["text"].lower()


def test_the_tool_chains_output_is_quiet_only_around_an_export(caplog: pytest.LogCaptureFixture) -> None:
    """What optimum reports as errors and what onnxruntime's quantizer advises on the root logger is dropped
    while an export runs on this thread; another thread's records, and everything after, still pass."""
    import logging
    import threading
    import warnings

    from localai_aio.gallery.onnx_tools import quiet_tool_chain

    optimum = logging.getLogger("optimum.exporters.onnx.convert")  # "-[x] values not close enough" is an error
    level = logging.getLogger("optimum").level
    with caplog.at_level(logging.INFO):
        with quiet_tool_chain():
            assert not optimum.isEnabledFor(logging.CRITICAL)
            logging.getLogger().warning("Please consider to run pre-processing before quantization")
            warnings.warn("tracing chatter", UserWarning, stacklevel=1)  # the test run would fail on it
            other = threading.Thread(target=lambda: logging.getLogger().warning("another thread's record"))
            other.start()
            other.join()
        logging.getLogger().warning("after the export")
    assert [record.getMessage() for record in caplog.records] == ["another thread's record", "after the export"]
    assert logging.getLogger("optimum").level == level and optimum.isEnabledFor(logging.ERROR)
    assert not logging.getLogger().filters
