"""Backend ``llama-cpp``: GGUF models on llama.cpp, many requests at once in one context.

The rooms, in the order a request meets them:

- ``engine``: ``LlamaCppEngine`` loads the model and its context and composes the parts below.
- ``vocabulary``: tokens to text and back, end-of-generation tokens, grammar checks; read-only, any thread.
- ``scheduler``: slots and the queue; each step plans one batch (running streams plus prompt chunks),
  executes it, and turns the newest request away when the context has no room left.
- ``sampling``: each choice's sampler chain, grammars checked through llguidance, logprobs.
- ``prompt_cache``: finished requests' cells in host memory, per ``cache_scope``, for the next request
  that starts the same way.
- ``pooling``: embeddings and rerank scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from localai_aio.backends.base import BackendError, require_file, scrub
from localai_aio.backends.llama_cpp.engine import LlamaCppEngine, extra_buffers
from localai_aio.backends.llama_cpp.vocabulary import _CAPTURE, _install_log_callback

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig, ServerSettings

__all__ = ["LlamaCppEngine", "_CAPTURE", "_install_log_callback", "extra_buffers", "load"]


def load(cfg: ModelConfig, settings: ServerSettings) -> LlamaCppEngine:
    try:
        return LlamaCppEngine(cfg, settings)
    except (ValueError, RuntimeError) as exc:
        raise BackendError(f"llama.cpp could not load the file: {scrub(exc, require_file(cfg))}") from None
