"""Versioned SQL migrations, applied in order on start.

Replicas that start together serialize on a Postgres advisory lock, so each migration runs
exactly once; the ones already recorded in schema_migrations are skipped.
"""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

# Any constant works; this one is "chatarch" in ASCII, unlikely to clash with other apps.
ADVISORY_LOCK_KEY = 0x6368617461726368


def available() -> list[tuple[str, str]]:
    """(version, sql) for every migrations/NNNN_*.sql shipped with the package, in order."""
    folder = resources.files("archive") / "migrations"
    found = [
        (entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found)


async def migrate(conn: asyncpg.Connection | PoolConnectionProxy) -> list[str]:
    """Apply the pending migrations; returns the versions applied by this call."""
    applied_now: list[str] = []
    # Session-level lock: held across the per-migration transactions below, released in
    # `finally` (and by Postgres itself if this process dies holding it).
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in available():
            if version in done:
                continue
            # One transaction per migration: a failure leaves no half-applied schema.
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("applied migration %s", version)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
    return applied_now
