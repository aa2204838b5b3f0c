"""Model YAMLs take effect without a restart: on SIGHUP, on ``POST /models/reload``, and as the models
directory changes (``models install`` into the directory of a running server serves the model at once).

A reload reads the directory again off the event loop and hands the configs to the registry, which
keeps requests in flight on what they hold (``ModelRegistry.reload``). A YAML that no longer parses
does not take its model away: the model it defined keeps its last good config, and the problem is
reported. Reloads run one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from localai_aio.config import ModelConfig, load_model_configs
from localai_aio.registry import Reloaded
from localai_aio.runtime import run_blocking
from localai_aio.server import keys

log = logging.getLogger(__name__)


def _read(models_path: str, current: dict[str, ModelConfig]) -> tuple[dict[str, ModelConfig], list[str]]:
    """The directory's configs, with the last good config kept for a model whose YAML is now broken."""
    configs, problems = load_model_configs(models_path)
    for name, cfg in current.items():
        if name not in configs and cfg.source is not None and Path(cfg.source).is_file() \
                and Path(cfg.source).suffix in (".yaml", ".yml"):
            claimed = any(c.source == cfg.source for c in configs.values())
            if not claimed:
                configs[name] = cfg  # still on disk but unreadable: keep serving what it said before
    return configs, problems


async def reload_models(app: web.Application, why: str) -> tuple[Reloaded, list[str]]:
    """Read the models directory again and serve what it holds now."""
    async with app[keys.RELOAD_LOCK]:
        current = dict(app[keys.MODEL_CONFIGS])
        configs, problems = await run_blocking(app[keys.EXECUTOR], _read, app[keys.SETTINGS].models_path, current)
        done = app[keys.REGISTRY].reload(configs)
        app[keys.MODEL_CONFIGS].clear()  # the same mapping: what reads it (the docs' model lists) sees it
        app[keys.MODEL_CONFIGS].update(configs)
        for name in done.changed + done.removed:
            app[keys.BATCHERS].pop(name, None)  # merged-request batchers are per model config
    for problem in problems:
        log.warning("%s", problem)
    if done.added or done.changed or done.removed:
        log.info("models reloaded (%s): added %s; changed %s; removed %s", why, ", ".join(done.added) or "none",
                 ", ".join(done.changed) or "none", ", ".join(done.removed) or "none")
    return done, problems


def _watched_root(models_path: str) -> Path | None:
    root = Path(models_path)
    return root.resolve() if root.is_dir() else None


async def _watch(app: web.Application) -> None:
    """Reload when a YAML of the models directory is written, renamed or deleted."""
    from watchfiles import awatch

    models_path = app[keys.SETTINGS].models_path
    root = await run_blocking(app[keys.EXECUTOR], _watched_root, models_path)
    if root is None:
        log.warning("models directory %s does not exist: not watching it (SIGHUP or POST /models/reload "
                    "read it once it does)", models_path)
        return

    def yaml_only(_change: object, path: str) -> bool:
        return path.endswith((".yaml", ".yml")) and Path(path).parent == root

    async for _ in awatch(root, watch_filter=yaml_only, debounce=300, step=50, recursive=False):
        try:
            await reload_models(app, "the models directory changed")
        except Exception:
            log.exception("reloading the models failed")


async def live_reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """SIGHUP reloads (where the loop can take signals); the directory is watched unless turned off."""
    app[keys.RELOAD_LOCK] = asyncio.Lock()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        task = asyncio.ensure_future(reload_models(app, "SIGHUP"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    hangup = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        hangup = True
    watcher = asyncio.ensure_future(_watch(app)) if app[keys.SETTINGS].watch_models else None
    yield
    if hangup:
        loop.remove_signal_handler(signal.SIGHUP)
    for task in [*tasks, *([watcher] if watcher else [])]:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
