"""What Ollama's routes share: model names with tags, its ``options`` as the shared sampling fields,
timestamps and durations in its units, ``keep_alive``, and NDJSON answers."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from localai_aio.api.common import registry, resolve_model
from localai_aio.config import ModelConfig
from localai_aio.errors import InvalidRequest, ModelNotFound
from localai_aio.server import keys
from localai_aio.server.sse import LineStream, ending

log = logging.getLogger(__name__)

#: ``options`` that are sampling fields of the same name.
SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "seed", "stop", "repeat_penalty", "presence_penalty",
                    "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta", "typical_p", "repeat_last_n",
                    "tfs_z")
#: ``options`` that set up Ollama's runner (memory, threads, GPUs, context size): this server's model YAML
#: and command line decide those, so they are accepted and have no effect. ``num_keep`` only matters when
#: a full context is shifted, which this server never does.
RUNNER_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread",
                            "numa", "low_vram", "f16_kv", "vocab_only", "logits_all", "embedding_only",
                            "num_keep", "penalize_newline", "num_gqa", "rope_frequency_base",
                            "rope_frequency_scale"})
QUANTIZATION = re.compile(r"(?i)[-_.]((?:i?q\d(?:_[a-z0-9]+)*)|f16|f32|bf16)(?:-\d+-of-\d+)?\.gguf$")


def quantization(cfg: ModelConfig) -> str:
    """The quantization level a GGUF's file name says (``Q4_K_M``), or ""."""
    found = QUANTIZATION.search(cfg.model_path.name) if cfg.model_path is not None else None
    return found.group(1).upper() if found else ""


def model_config(request: web.Request, name: Any, usecase: str | None = None) -> ModelConfig:
    """The model ``name`` means: a model or an alias, bare or with ``:latest`` or its quantization as the
    tag; 404 in Ollama's words otherwise."""
    reg = registry(request)
    if not isinstance(name, str) or not name:
        raise InvalidRequest("model is required", param="model")
    known = {*reg.names(), *reg.aliases()}
    if name not in known:
        base, _, tag = name.rpartition(":")
        if base not in known or tag.lower() not in ("latest", quantization(reg.config(base)).lower() or "latest"):
            raise ModelNotFound(f'model "{name}" not found, try pulling it first', param="model")
        name = base
    return resolve_model(request, name, usecase) if usecase else reg.config(name)


def tagged(name: str) -> str:
    """A model's name as Ollama lists it: with a tag."""
    return name if ":" in name else f"{name}:latest"


def sampling_fields(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` as the sampling fields of a chat request (``api.sampling`` checks their values)."""
    fields: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key in SAMPLING_OPTIONS:
            fields[key] = value
        elif key == "num_predict":
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest("Invalid value for 'options.num_predict': must be an integer",
                                     param="options.num_predict")
            if value > 0:  # -1 (no limit) and -2 (fill the context): up to the context
                fields["max_tokens"] = value
            elif value == 0:
                raise InvalidRequest("Invalid value for 'options.num_predict': 0 generates nothing; use -1 for "
                                     "no limit", param="options.num_predict")
        elif key not in RUNNER_OPTIONS:
            log.warning("ignoring an Ollama option this server does not know: %s", key)
    return fields


def created_at() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def unloads(keep_alive: Any) -> bool:
    """Whether ``keep_alive`` says to unload the model after this request (0, "0", "0s", "0m"...)."""
    if isinstance(keep_alive, bool):
        raise InvalidRequest("Invalid value for 'keep_alive': a duration (\"5m\") or a number of seconds",
                             param="keep_alive")
    if isinstance(keep_alive, int | float):
        return keep_alive == 0
    if isinstance(keep_alive, str):
        found = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*", keep_alive)
        if found is None:
            raise InvalidRequest(f"Invalid value for 'keep_alive': {keep_alive!r} is not a duration (\"5m\", "
                                 "\"1h\", \"0\")", param="keep_alive")
        return float(found.group(1)) == 0
    return False


class Clock:
    """A request's durations in nanoseconds, as Ollama reports them: loading the model, evaluating the
    prompt (until the first piece of the answer) and generating the rest."""

    def __init__(self) -> None:
        self.started = time.monotonic_ns()
        self.load = 0
        self.prepared = self.first = self.ended = 0

    async def load_model(self, request: web.Request, cfg: ModelConfig) -> None:
        """Load the model now if it is not, so the time it takes is ``load_duration``."""
        reg = registry(request)
        if not reg.is_loaded(cfg.name):
            began = time.monotonic_ns()
            await reg.load(cfg.name)
            self.load = time.monotonic_ns() - began

    def mark_prepared(self) -> None:
        self.prepared = time.monotonic_ns()

    def mark_piece(self) -> None:
        if not self.first:
            self.first = time.monotonic_ns()

    def mark_end(self) -> None:
        self.ended = time.monotonic_ns()

    def figures(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        self.ended = self.ended or time.monotonic_ns()
        first = self.first or self.ended
        prepared = self.prepared or first
        return {"total_duration": self.ended - self.started, "load_duration": self.load,
                "prompt_eval_count": prompt_tokens, "prompt_eval_duration": first - prepared,
                "eval_count": completion_tokens, "eval_duration": self.ended - first}


async def after(request: web.Request, cfg: ModelConfig, keep_alive: Any) -> None:
    """``keep_alive: 0``: unload the model once this request is done (if no other request holds it)."""
    if unloads(keep_alive):
        await registry(request).unload(cfg.name)


async def stream_lines(request: web.Request, chunks: AsyncIterator[dict[str, Any]], what: str) -> web.StreamResponse:
    """An NDJSON answer; an error once it started is its last line, ``{"error": "..."}``."""
    lines = LineStream(request, request.app[keys.SETTINGS].write_timeout)
    try:
        async for chunk in chunks:
            await lines.send(chunk)
        return await lines.close()
    except (Exception, asyncio.CancelledError) as exc:
        error = ending(lines, exc, what)
        if error is not None:
            await lines.send(error.body_for("ollama"))
        return await lines.close() if error is not None else lines.response
