"""LocalAI gallery entries installed with `models install FILE`: files from the (stand-in) Hub and from
plain http(s), the base config, overrides, and what this server does not use named, not dropped."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hub_standin import Hub, RunningHub
from localai_aio.gallery.install import InstallError
from localai_aio.gallery.localai import convert
from tiny_models import write_tiny_gguf

pytest.importorskip("huggingface_hub")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("lg") / "tiny.gguf").read_bytes()


def entry_files(tmp_path: Path, gguf: bytes) -> Path:
    base = tmp_path / "chatml.yaml"  # a base config, as LocalAI's gallery/chatml.yaml
    base.write_text(yaml.safe_dump({"name": "chatml", "config_file": yaml.safe_dump({
        "backend": "llama-cpp", "context_size": 4096, "mmap": True, "f16": True,
        "template": {"chat_message": "<|im_start|>{{ .RoleName }}\n{{.Content}}<|im_end|>",
                     "chat": "{{.Input}}\n<|im_start|>assistant", "completion": "{{.Input}}"},
        "stopwords": ["<|im_end|>"]})}))
    index = tmp_path / "index.yaml"
    index.write_text(yaml.safe_dump([
        {"name": "tiny-chat", "url": str(base), "license": "apache-2.0", "description": "A tiny chat model",
         "urls": ["https://huggingface.co/org/tiny-GGUF"], "tags": ["llm", "gguf"],
         "overrides": {"context_size": 256, "parameters": {"model": "tiny.Q8_0.gguf"}},
         "files": [{"filename": "tiny.Q8_0.gguf", "sha256": hashlib.sha256(gguf).hexdigest(),
                    "uri": "huggingface://org/tiny-GGUF/tiny.Q8_0.gguf"}]},
        {"name": "whisper-cpp", "overrides": {"backend": "whisper", "parameters": {"model": "ggml.bin"}},
         "files": [{"filename": "ggml.bin", "uri": "huggingface://org/whisper/ggml.bin"}]},
    ]))
    return index


def cli(tmp_path: Path, spec: str, endpoint: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "localai_aio", "models", "install", spec, "--models-path",
                           str(tmp_path / "models")], capture_output=True, text=True, timeout=300, env=env)


def test_a_localai_entry_installs_and_says_what_it_does_not_use(tmp_path: Path, gguf: bytes) -> None:
    index = entry_files(tmp_path, gguf)
    with RunningHub(Hub(repos={"org/tiny-GGUF": {"tiny.Q8_0.gguf": gguf}})) as hub:
        done = cli(tmp_path, f"{index}#tiny-chat", hub.url)
    assert done.returncode == 0, done.stderr
    assert "tiny-chat: installed in" in done.stdout
    assert "not used here: template.chat, template.chat_message (Go templates" in done.stderr
    config = yaml.safe_load((tmp_path / "models" / "tiny-chat.yaml").read_text())
    assert config["backend"] == "llama-cpp" and config["context_size"] == 256  # the override wins
    assert config["parameters"] == {"model": "tiny-chat/tiny.Q8_0.gguf"}
    assert config["template"] == {"completion": "{{.Input}}"} and config["stopwords"] == ["<|im_end|>"]
    assert (tmp_path / "models" / "tiny-chat" / "tiny.Q8_0.gguf").read_bytes() == gguf


def test_an_index_needs_a_name_and_unknown_backends_are_refused(tmp_path: Path, gguf: bytes) -> None:
    index = entry_files(tmp_path, gguf)
    done = cli(tmp_path, str(index), "http://127.0.0.1:9")
    assert done.returncode != 0 and f"pick one with {index}#NAME" in done.stderr
    done = cli(tmp_path, f"{index}#whisper-cpp", "http://127.0.0.1:9")
    assert done.returncode != 0 and "backend 'whisper' is not available here" in done.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_uri_kinds() -> None:
    raw = {"name": "m", "files": [
        {"filename": "a.gguf", "sha256": "0" * 64, "uri": "https://huggingface.co/org/repo/resolve/abc123/sub/a.gguf"},
        {"filename": "b.onnx", "sha256": "1" * 64, "uri": "https://example.org/voices/b.onnx"},
        {"filename": "c.json", "uri": "huggingface://org/repo/c.json"}]}
    entry, unused = convert(raw, "m.yaml")
    assert [dict(f.source) for f in entry.files] == [
        {"hf": "org/repo", "revision": "abc123", "file": "sub/a.gguf"}, {"url": "https://example.org/voices/b.onnx"},
        {"hf": "org/repo", "file": "c.json"}]
    assert unused == ["no sha256 for c.json: installed unchecked"]
    with pytest.raises(InstallError, match="oci:// are not supported"):
        convert({"name": "x", "files": [{"filename": "x", "uri": "oci://registry/x"}]}, "x.yaml")
    with pytest.raises(InstallError, match="needs a relative `filename`"):
        convert({"name": "x", "files": [{"filename": "../x", "uri": "huggingface://o/r/x"}]}, "x.yaml")


def test_plain_http_files(tmp_path: Path, gguf: bytes) -> None:
    with RunningHub(Hub(repos={"org/tiny-GGUF": {"tiny.Q8_0.gguf": gguf}})) as hub:
        entry = tmp_path / "plain.yaml"
        files = [{"filename": "m.gguf", "sha256": hashlib.sha256(gguf).hexdigest(),
                  "uri": f"{hub.url}/cdn/org/tiny-GGUF/tiny.Q8_0.gguf"}]
        entry.write_text(yaml.safe_dump({"name": "plain", "files": files,
                                         "config_file": "backend: llama-cpp\nparameters:\n  model: m.gguf\n"}))
        done = cli(tmp_path, str(entry), hub.url)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "plain" / "m.gguf").read_bytes() == gguf
