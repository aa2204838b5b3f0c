"""``models`` subcommands."""

from __future__ import annotations

import argparse


def add_models_command(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="List and install models.")
    models.set_defaults(func=lambda args: models.print_help() or 0)
