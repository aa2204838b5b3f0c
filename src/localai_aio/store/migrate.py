"""Versioned schema migrations: ``migrations/<dialect>/NNNN_name.sql``, applied in order, each in its own
transaction together with its row in ``schema_migrations``, so a database is always at exactly one
version. The stores call ``apply``; PostgreSQL holds an advisory lock around it so that replicas
starting together apply each migration once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).parent / "migrations"
NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
         "applied_at BIGINT NOT NULL)")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(dialect: str) -> list[Migration]:
    found = []
    for path in sorted((FOLDER / dialect).glob("*.sql")):
        match = NAME.match(path.name)
        if match is None:
            raise RuntimeError(f"migration file {path} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{dialect} migrations must be numbered 1..n without gaps, found {versions}")
    return found


def pending(dialect: str, applied: Iterable[int], target: int | None = None) -> list[Migration]:
    done = set(applied)
    return [m for m in migrations(dialect) if m.version not in done and (target is None or m.version <= target)]


def record(migration: Migration, placeholder: str) -> tuple[str, tuple]:
    """The INSERT that records ``migration`` as applied, in the driver's placeholder style."""
    sql = f"INSERT INTO schema_migrations (version, name, applied_at) VALUES ({', '.join([placeholder] * 3)})"
    return sql, (migration.version, migration.name, int(time.time()))


def latest(dialect: str) -> int:
    return len(migrations(dialect))

