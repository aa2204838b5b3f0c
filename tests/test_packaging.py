"""The package works when installed as a package: a wheel built from the repository, installed into a
fresh virtual environment, run from a directory that has no ``conf/``. The gallery, the default
settings and the API spec come from the package itself.

This builds and installs (dependencies from the package index), so it runs where
``LOCALAI_TEST_PACKAGE`` is set: the py311 environment of the test matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.environ.get("LOCALAI_TEST_PACKAGE"),
                                reason="builds and installs the wheel; set LOCALAI_TEST_PACKAGE=1")


def run(*cmd: str | Path, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOCALAI_GALLERY")})


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``localai-aio`` command of a fresh venv holding only the wheel and its dependencies."""
    work = tmp_path_factory.mktemp("package")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", ROOT, cwd=work)
    assert built.returncode == 0, built.stderr
    [wheel] = (work / "dist").glob("localai_aio-*.whl")
    assert run(sys.executable, "-m", "venv", work / "venv", cwd=work).returncode == 0
    pip = run(work / "venv" / "bin" / "pip", "install", "-q", wheel, cwd=work)
    assert pip.returncode == 0, pip.stderr
    return work / "venv" / "bin" / "localai-aio"


def test_models_list_uses_the_packaged_gallery(installed: Path, tmp_path: Path) -> None:
    listing = run(installed, "models", "list", "--models-path", "m", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    names = {line.split()[0] for line in listing.stdout.splitlines()}
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2", "en-us-joe-medium", "whisper-base"} <= names


def test_cli_errors_are_one_line(installed: Path, tmp_path: Path) -> None:
    for args in (["models", "list", "--gallery", "missing.yaml"], ["models", "install", "no-such-model"],
                 ["serve", "--config-file", "missing.yaml"]):
        result = run(installed, *args, cwd=tmp_path)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, (args, result.stderr)


def test_install_and_serve_from_another_directory(installed: Path, tmp_path: Path) -> None:
    done = run(installed, "models", "install", "en-us-joe-medium", "--models-path", "m", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m" / "en-us-joe-medium" / "en_US-joe-medium.onnx").stat().st_size > 10_000_000
    assert (tmp_path / "m" / "en-us-joe-medium.yaml").is_file()
    port = free_port()
    server = subprocess.Popen([str(installed), "serve", "--models-path", "m", "--address", f"127.0.0.1:{port}"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.3)
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
            ids = {m["id"] for m in json.load(resp)["data"]}
        assert {"en-us-joe-medium", "tts-1"} <= ids
        with urllib.request.urlopen(url + "/swagger.json", timeout=10) as resp:
            assert json.load(resp)["openapi"] == "3.0.3"  # built from the spec shipped in the package
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stderr.close()
