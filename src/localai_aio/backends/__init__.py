"""Engine backends, one module each, registered by the name a model YAML uses in ``backend:``.

The contracts the layers above rely on live here too: ``base`` (loading, and the engine errors that
``errors.from_engine`` turns into HTTP answers), ``text`` (``TextEngine``, ``GenParams`` and the token
stream) and ``families`` (embeddings, rerank, speech, transcription, images). Nothing under
``backends/`` reads a request or knows an HTTP error.

Modules are imported only when a model that needs them loads, so the server starts (and serves
the other models) without every engine installed; a missing engine is a clear load error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from localai_aio.backends.base import Backend, BackendError
from localai_aio.cpu_budget import Priority

#: backend name -> (module, the pip extra that installs its engine)
BACKEND_MODULES: dict[str, tuple[str, str]] = {
    "llama-cpp": ("localai_aio.backends.llama_cpp", "llama"),
    "ctransformers": ("localai_aio.backends.ctransformers", "ctransformers"),
    "onnx-embeddings": ("localai_aio.backends.onnx_embeddings", "onnx"),
    "onnx-rerank": ("localai_aio.backends.onnx_rerank", "onnx"),
    "piper": ("localai_aio.backends.piper_tts", "tts"),
    "onnx-diffusion": ("localai_aio.backends.onnx_diffusion", "diffusion"),
    "onnx-whisper": ("localai_aio.backends.onnx_whisper", "stt"),
}

#: Backends whose one instance serves many requests at once (continuous batching).
CONCURRENT_BACKENDS = frozenset({"llama-cpp"})

#: Backends whose work is bulk by default (cpu_budget): long or large jobs nobody watches token by token.
#: Text generation and speech are conversations, interactive.
BULK_BACKENDS = frozenset({"onnx-whisper", "onnx-embeddings", "onnx-rerank", "onnx-diffusion"})


def default_priority(backend: str | None) -> Priority:
    return Priority.BULK if backend in BULK_BACKENDS else Priority.INTERACTIVE


def _lazy(module: str, extra: str) -> Backend:
    def load(cfg, settings):  # noqa: ANN001, ANN202 - matches Backend
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise BackendError(f"its engine is not installed ({exc.name}); "
                               f"install it with: pip install 'localai-aio[{extra}]'") from None
        return mod.load(cfg, settings)

    return load


def default_backends() -> dict[str, Callable]:
    return {name: _lazy(module, extra) for name, (module, extra) in BACKEND_MODULES.items()}
