"""What the benchmarks share: a real server process on a free loopback port, ready before use (ours, or
llama.cpp's ``llama-server`` for comparison), and the resident memory of a process tree."""

from __future__ import annotations

import contextlib
import functools
import os
import re
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
    with tempfile.TemporaryDirectory() as data, tempfile.TemporaryFile() as log:
        cmd = [sys.executable, "-m", "localai_aio", "serve", "--address", f"127.0.0.1:{port}", "--models-path",
               models_path, "--config-dir", data, "--log-level", "warning", *flags]
        with _running(cmd, url + "/readyz", log, "the server") as proc:
            yield url, proc


@contextlib.contextmanager
def _running(cmd: list[str], health_url: str, log, name: str) -> Iterator[subprocess.Popen]:  # noqa: ANN001
    """Run ``cmd`` (output to ``log``) until ``health_url`` answers 200, yield it, then stop it (SIGTERM).
    Fails with the log's tail if the process exits first or 120 s pass."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready within 120 s: {_tail(log)}")
            with contextlib.suppress(OSError), urllib.request.urlopen(health_url, timeout=1) as resp:
                if resp.status == 200:
                    break
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


def _tail(log, size: int = 2000) -> str:  # noqa: ANN001
    log.seek(0)
    return log.read().decode("utf-8", "replace")[-size:].strip()


@functools.cache
def serve_has_flag(flag: str) -> bool:
    """Whether ``localai_aio serve`` (in this Python) knows ``flag``, e.g. ``--parallel``."""
    out = subprocess.run([sys.executable, "-m", "localai_aio", "serve", "--help"], capture_output=True, text=True,
                         timeout=120)
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", out.stdout) is not None


@contextlib.contextmanager
def llama_server(binary: str, gguf: str, *, ctx: int, slots: int, threads: int,
                 extra: tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start llama.cpp's ``llama-server`` on ``gguf`` with ``slots`` sequence slots of ``ctx`` tokens each
    (``-c ctx*slots``, unified KV cache and continuous batching when its --help lists them), wait for /health,
    yield (url, process), stop it."""
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    known = help_text.stdout + help_text.stderr
    flags = ["-m", gguf, "-c", str(ctx * slots), "-np", str(slots), "-t", str(threads), "-tb", str(threads)]
    for opt in ("--kv-unified", "--cont-batching", "--no-webui"):
        if opt in known:
            flags.append(opt)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        cmd = [binary, *flags, "--host", "127.0.0.1", "--port", str(port), *extra]
        with _running(cmd, url + "/health", log, "llama-server") as proc:
            yield url, proc


def tree_rss_kb(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile (kB) of ``pid`` plus its descendants, from /proc."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    totals = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    for p in pids:
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in totals:
                    totals[key] += int(line.split()[1])
    return totals
