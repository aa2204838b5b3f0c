"""What the benchmarks share: a real server process on a free loopback port, ready before use."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MODELS = os.environ.get("LOCALAI_TEST_MODELS_PATH", str(Path.home() / ".cache/localai-aio/models"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(models_path: str, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``localai_aio serve`` with ``flags``, wait for /readyz, yield (url, process), stop it (SIGTERM)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen(
            [sys.executable, "-m", "localai_aio", "serve", "--address", f"127.0.0.1:{port}", "--models-path",
             models_path, "--config-dir", data, "--log-level", "warning", *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode}")
                with contextlib.suppress(OSError), urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
                time.sleep(0.1)
            yield url, proc
        finally:
            proc.terminate()
            proc.wait(60)
