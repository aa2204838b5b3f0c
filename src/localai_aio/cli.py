"""Command line: ``serve`` runs the server; ``models`` lists and installs models from the gallery."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from localai_aio import __version__
from localai_aio.config import ConfigError, add_setting_flags, load_settings
from localai_aio.logs import setup_logging

log = logging.getLogger("localai_aio")
#: Seconds a thread may hold the GIL while another waits for it (Python's default is 0.005).
SWITCH_INTERVAL = 0.001


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from localai_aio.app import create_app

    flags = {k: v for k, v in vars(args).items() if k not in {"command", "func"}}
    try:
        settings = load_settings(flags)
    except ConfigError as exc:
        print(f"localai-aio: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    log.info("localai_aio %s listening on http://%s (models from %s)", __version__, settings.address,
             settings.models_path)
    # Threads that parse, render or compile for a big request hold the GIL for Python's whole switch
    # interval (5 ms) whenever an engine thread wants it back between native calls: with 1 ms, a stream
    # beside such a request loses a few ms per token instead of tens.
    sys.setswitchinterval(SWITCH_INTERVAL)
    web.run_app(app, host=settings.host, port=settings.port, handler_cancellation=True,
                shutdown_timeout=settings.shutdown_grace, print=None, access_log=None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localai-aio", description="A local, OpenAI-compatible AI server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="Run the API server.",
        description="Run the API server. Precedence: flags > environment variables > config file > defaults.")
    add_setting_flags(serve)
    serve.set_defaults(func=_serve)

    from localai_aio.gallery.cli import add_models_command

    add_models_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Every failure is one line on stderr and a non-zero exit, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from localai_aio.gallery.install import InstallError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("localai-aio: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, InstallError) as exc:
        print(f"localai-aio: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the one place that turns the unexpected into a line
        print(f"localai-aio: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
