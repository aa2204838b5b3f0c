from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from localai_aio.app import create_app
from localai_aio.config import ServerSettings, load_model_configs
from tiny_models import write_tiny_gguf

#: Where the real default models are installed (``.ci/run`` and ``scripts/test.sh`` set it).
DEFAULT_MODELS = Path(os.environ.get("LOCALAI_TEST_MODELS_PATH", "models"))


def have_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    engines = {"llama": "llama_cpp", "ctransformers": "ctransformers"}
    for item in items:
        for marker, module in engines.items():
            if item.get_closest_marker(marker) and not have_module(module):
                item.add_marker(pytest.mark.skip(reason=f"{module} is not installed"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_bpe_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-bpe.gguf", bpe=True)


def write_model_yaml(models: Path, name: str, **config: object) -> Path:
    path = models / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **config}))
    return path


@pytest.fixture
def models_dir(tmp_path: Path, tiny_gguf: Path) -> Path:
    """A models directory with the tiny GGUF served by both engines."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "tiny-llama", backend="llama-cpp", context_size=256,
                     parameters={"model": "tiny.gguf"})
    write_model_yaml(models, "tiny-ct", backend="ctransformers", context_size=256,
                     parameters={"model": "tiny.gguf"})
    return models


@pytest.fixture
def settings(tmp_path: Path, models_dir: Path) -> ServerSettings:
    return ServerSettings(models_path=str(models_dir), config_dir=str(tmp_path / "data"), threads=1,
                          context_size=256)


@pytest.fixture
async def client(aiohttp_client, settings: ServerSettings):  # noqa: ANN001
    return await aiohttp_client(create_app(settings))


@pytest.fixture(scope="session")
def postgres() -> Iterator:
    """A real PostgreSQL server for the whole session (skipped where its binaries are not installed)."""
    from pg_server import postgres_server

    with postgres_server(free_port()) as server:
        yield server


@pytest.fixture
def database_url(postgres) -> str:  # noqa: ANN001
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres.create_database(f"t_{secrets.token_hex(6)}")


@pytest.fixture
def make_client(aiohttp_client, tmp_path: Path):  # noqa: ANN001
    """Build a client for an app with other settings, model configs or backends."""
    async def make(settings: ServerSettings | None = None, **kwargs: object):
        settings = settings or ServerSettings(models_path=str(tmp_path / "none"),
                                              config_dir=str(tmp_path / "data"))
        return await aiohttp_client(create_app(settings, **kwargs))

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "localai_aio", "serve", "--address", f"127.0.0.1:{self.port}", *args]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def start(self, log_path: Path, timeout: float = 60.0) -> ServerProcess:
        import urllib.error
        import urllib.request

        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except urllib.error.HTTPError as not_ready:  # 503 while models load: its connection is still open
                not_ready.close()
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become ready: {log_path.read_text()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""


@contextlib.contextmanager
def tiny_gguf_server(folder: Path, models: dict[str, dict]) -> Iterator[ServerProcess]:
    """A server process on tiny GGUF models, each written with its ``write_tiny_gguf`` options, with two
    slots each and one thread."""
    path = folder / "models"
    path.mkdir()
    for name, options in models.items():
        write_tiny_gguf(path / f"{name}.gguf", **options)
        write_model_yaml(path, name, backend="llama-cpp", context_size=1024, parallel=2,
                         parameters={"model": f"{name}.gguf"})
    proc = ServerProcess(["--models-path", str(path), "--config-dir", str(folder / "data"), "--threads", "1"],
                         cwd=folder)
    proc.start(folder / "server.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator:
    """Start real server processes; all are stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> ServerProcess:
        server = ServerProcess(list(args), env=env, cwd=tmp_path)
        started.append(server)
        return server.start(tmp_path / f"server-{len(started)}.log", timeout)

    yield start
    for server in started:
        server.stop()


def default_model_configs(*names: str):  # noqa: ANN201
    """The installed default models' configs, or skip when their files are absent."""
    configs, _ = load_model_configs(DEFAULT_MODELS)
    for name in names:
        cfg = configs.get(name)
        if cfg is None or cfg.error or cfg.model_path is None or not cfg.model_path.exists():
            pytest.skip(f"default model {name!r} is not installed under {DEFAULT_MODELS} "
                        f"(install with: python -m localai_aio models install {name})")
    return configs


async def sse_events(resp) -> list:  # noqa: ANN001
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/event-stream"
    raw = (await resp.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]"
    return events[:-1]


async def stalled_request(client, path: str, body: dict) -> socket.socket:  # noqa: ANN001
    """Send ``body`` to ``path`` on the test server from a raw socket with a tiny receive buffer that the
    caller never reads: a client that has stopped reading. Close the socket when done."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (client.server.host, client.server.port))
    data = json.dumps(body).encode()
    await loop.sock_sendall(sock, b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return sock


async def drain_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sent on ``sock``, until it closes the connection (10 s without data fails)."""
    loop = asyncio.get_running_loop()
    received = b""
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
