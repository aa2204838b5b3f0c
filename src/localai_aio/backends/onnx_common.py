"""ONNX Runtime sessions for every ONNX backend: threads and execution providers from the config.

The CPU ``onnxruntime`` and ``onnxruntime-gpu`` packages install into the same folder (one at a time).
With onnxruntime-gpu on a machine without CUDA, ``get_available_providers()`` still lists CUDA; the
session falls back to the CPU, and only ``session.get_providers()`` says what really runs, so that is
what gets logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localai_aio import cpu_budget
from localai_aio.backends.base import BackendError, scrub, threads_for

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig, ServerSettings

log = logging.getLogger(__name__)


def default_providers(available: list[str]) -> list[str]:
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def make_session(path: Path, cfg: ModelConfig, settings: ServerSettings, *, spinning: bool = False,
                 model: bytes | None = None, threads: int | None = None) -> Any:
    """An ONNX Runtime session for ``path`` (or for ``model``, the file's graph changed in memory), on
    ``threads`` threads (default: the model's, ``threads_for``)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime is not installed; install it with: pip install 'localai-aio[onnx]' "
                           "(or 'localai-aio[onnx-gpu]')") from None
    available = ort.get_available_providers()
    wanted = cfg.option("providers") or default_providers(available)
    if isinstance(wanted, str):
        wanted = [p.strip() for p in wanted.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in available]
    if unknown:
        raise BackendError(f"execution provider(s) {', '.join(unknown)} not available here "
                           f"(available: {', '.join(available)})")
    options = ort.SessionOptions()
    threads = threads or threads_for(cfg, settings)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # ORT's worker threads spin while idle by default. For short runs that many requests share (embeddings)
    # the event loop and other models need those cores, so idle workers sleep; long chains of small ops
    # (a VITS voice) lose more to waking threads, so those backends spin when they have the machine to
    # themselves. Under the CPU budget the next piece on these cores is often another engine's, which a
    # spinning pool would crowd, so nobody spins. YAML `spinning` decides over both.
    spin = cfg.option("spinning")
    spin = (spinning and settings.cpu_policy == "off") if spin is None else bool(spin)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        session = ort.InferenceSession(model if model is not None else str(path), sess_options=options,
                                       providers=wanted)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise BackendError(f"ONNX Runtime could not load {path.name}: {scrub(exc, path)}") from None
    log.info("model %s: %s on %s (%d threads)", cfg.name, path.name, ", ".join(session.get_providers()), threads)
    return BudgetedSession(session, threads)


class BudgetedSession:
    """An ONNX Runtime session whose every run is a piece of work on the process's CPU budget (see
    ``cores``): it waits for as many free cores as the session has threads. Everything else is the session's."""

    def __init__(self, session: Any, threads: int) -> None:
        self._session = session
        self.threads = threads

    def run(self, *args: Any, **kwargs: Any) -> Any:
        with cpu_budget.piece(self.threads):
            return self._session.run(*args, **kwargs)

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        with cpu_budget.piece(self.threads):
            return self._session.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)
