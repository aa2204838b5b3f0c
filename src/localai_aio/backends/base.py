"""The small interface every engine backend implements.

A backend turns a ``ModelConfig`` into an engine instance. The load, and every later call into the
instance, runs on one thread that the registry dedicates to that instance (``runtime.EngineThread``),
so an engine never needs locking of its own. Most engines serve one request at a time: the registry
keeps ``parallel`` instances of them. A batching engine (``CONCURRENT``: llama-cpp) is loaded once
and takes ``parallel`` requests at once in its own loop. Capabilities are plain methods; a backend
that lacks one simply does not define it, and the API layer answers 400 naming the limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig, ServerSettings


class BackendError(Exception):
    """A backend cannot load or run a model; the message is shown to the client."""


class RequestRefused(BackendError):
    """The engine refuses this request, which is no failure of the engine: the request fails, the engine
    goes on, and the client is told why, ``param`` naming the request field (``errors.from_engine``)."""

    param: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param


class ConstraintError(RequestRefused):
    """A request's output constraint cannot be compiled, or no token can continue it."""

    param = "grammar"


class InputRefused(RequestRefused):
    """The request asks what this model cannot give for its input."""


class PromptTooLong(RequestRefused):
    """A request's tokens do not fit the model's context."""

    param = "messages"


class Unsupported(RequestRefused):
    """The model cannot do what the request asks (a capability it lacks, not a failure)."""

    param = "model"


class EngineBusy(BackendError):
    """The engine has no room for this request now; retrying after ``retry_after`` seconds may succeed."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Engine(Protocol):
    """One loaded model instance. ``close`` releases its memory."""

    def close(self) -> None: ...


#: A backend is a blocking loader: (model config, server settings) -> engine instance.
Backend = Callable[["ModelConfig", "ServerSettings"], Any]


def scrub(message: object, path: Path) -> str:
    """An engine's error message without filesystem paths (clients see it; the layout is not theirs)."""
    text = " ".join(str(message).split())
    for full in sorted({str(path), str(path.resolve()), str(path.parent), str(path.resolve().parent)},
                       key=len, reverse=True):
        text = text.replace(full, path.name if full.endswith(path.name) else "<models>")
    return text[:300]


def read_json(path: Path) -> dict[str, Any]:
    """A model folder's JSON file ({} when absent); errors name the file, never its full path."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot read {path.name}: {scrub(exc, path)}") from None


def threads_for(cfg: ModelConfig, settings: ServerSettings) -> int:
    return int(cfg.threads or settings.threads or 1)


def slots_for(cfg: ModelConfig, settings: ServerSettings) -> int:
    """Requests a batching engine runs at once: the YAML's ``parallel``, else the server's default."""
    return int(cfg.parallel or settings.parallel or 1)


def context_size_for(cfg: ModelConfig, settings: ServerSettings) -> int:
    return int(cfg.context_size or settings.context_size)


def require_file(cfg: ModelConfig) -> Path:
    if cfg.error:
        raise BackendError(cfg.error)
    if cfg.model_path is None:
        raise BackendError(f"model {cfg.name!r} has no `parameters.model` file configured")
    if not cfg.model_path.exists():
        raise BackendError(f"model file of {cfg.name!r} does not exist")
    return cfg.model_path


def infer_backend(cfg: ModelConfig) -> str | None:
    """The backend a model's file implies when its YAML names none (LocalAI infers it the same way)."""
    path = cfg.model_path
    if path is None:
        return None
    if path.suffix.lower() == ".gguf":
        return "llama-cpp"
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if "model_index.json" in names:
            return "onnx-diffusion"
        if "encoder_model.onnx" in names:
            return "onnx-whisper"
        if "model.onnx" in names:
            return "onnx-embeddings"
    if path.suffix == ".onnx" and path.with_name(path.name + ".json").exists():
        return "piper"
    return None
