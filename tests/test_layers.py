"""The tree's layers (docs/ARCHITECTURE.md) held against the code: no module imports one of a higher layer,
and nothing under ``backends/`` reads a request or knows an HTTP error."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "localai_aio"

#: From the top down; a module belongs to the row of its longest matching prefix.
LAYERS = [
    ("localai_aio.__main__", "localai_aio.cli", "localai_aio.app"),
    ("localai_aio.api",),
    ("localai_aio.server",),
    ("localai_aio.text", "localai_aio.registry", "localai_aio.gallery"),
    ("localai_aio.errors",),
    ("localai_aio.backends",),
    ("localai_aio.config",),
    ("localai_aio.store", "localai_aio.audio", "localai_aio.runtime", "localai_aio.metrics", "localai_aio.principal",
     "localai_aio.logs", "localai_aio"),
]


def layer(module: str) -> int:
    matches = [(len(prefix), row) for row, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1]


def imports() -> list[tuple[str, str]]:
    """(importer, imported) for every import of a package module, lazy and TYPE_CHECKING ones too."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "localai_aio":
                found += [(module, f"localai_aio.{a.name}") for a in node.names if a.name != "__version__"]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("localai_aio."):
                found.append((module, node.module))
            elif isinstance(node, ast.Import):
                found += [(module, a.name) for a in node.names if a.name.startswith("localai_aio")]
    return found


def test_no_import_runs_back_up() -> None:
    assert [(a, b) for a, b in imports() if layer(b) < layer(a)] == []


def test_engines_know_no_request_layer() -> None:
    above = ("localai_aio.api", "localai_aio.server", "localai_aio.errors", "localai_aio.text")
    assert [(a, b) for a, b in imports() if a.startswith("localai_aio.backends") and b.startswith(above)] == []
