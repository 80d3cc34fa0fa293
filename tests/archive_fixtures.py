"""Archive replicas as real processes, a migrated database, and publishing helpers.

    from tests.archive_fixtures import archive_db, start_archive  # noqa: F401

`archive_db` is an asyncpg pool on the test's fresh database with the archive's schema.
`start_archive(nats_url, database_url, logs_dir, name, **env)` starts one replica (a real
`python -m archive`) and waits until it is ready. Request the `nc` fixture first: it wipes
the streams, and the replicas provision them again.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from archive import migrations
from archive.settings import ArchiveSettings
from chatlib import codec, ids, names, nats_wiring
from chatlib.proto.chat import v1 as pb
from devtools.processes import ServiceProcess
from devtools.servers import free_port, url_as
from nats.js import JetStreamContext


@pytest.fixture
async def archive_db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh database holding the archive's schema."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrations.migrate(conn)
    yield pool
    await pool.close()


class ArchiveProc(ServiceProcess):
    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples from /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
        wanted = f"{name}{{{labels}" if labels else name
        total = 0.0
        for line in text.splitlines():
            if line.startswith(wanted) and not line.startswith("#"):
                key = line.split(" ")[0]
                if key == name or key.startswith(name + "{"):
                    total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture
def archive_procs() -> Iterator[list[ArchiveProc]]:
    """Replicas started in a test; any still running at the end are SIGKILLed."""
    procs: list[ArchiveProc] = []
    yield procs
    for proc in procs:
        proc.kill()


def start_archive(
    procs: list[ArchiveProc],
    nats_url: str,
    database_url: str,
    logs_dir: Path,
    wait_ready: bool = True,
    **env: str,
) -> ArchiveProc:
    port = free_port()
    name = f"archive-{len(procs) + 1}"
    settings = {
        "ARCHIVE_NATS_SERVERS": url_as(nats_url, "archive"),
        "ARCHIVE_DATABASE_URL": database_url,
        "ARCHIVE_HTTP_PORT": str(port),
        "ARCHIVE_HTTP_HOST": "127.0.0.1",
        "ARCHIVE_INSTANCE_ID": name,
        "ARCHIVE_ACK_WAIT": "2",
        "ARCHIVE_MONITOR_INTERVAL": "0.3",
        "ARCHIVE_FETCH_TIMEOUT": "0.5",
        **env,
    }
    proc = ArchiveProc("archive", settings, port, logs_dir / f"{name}.log")
    procs.append(proc)
    proc.start(wait_ready=wait_ready)
    return proc


async def provision(js: JetStreamContext) -> None:
    """The streams the archive relies on, so a test can publish before a replica runs."""
    await nats_wiring.provision(js, ArchiveSettings())


def room_message(room: str, n: int, sender: str = "alice") -> pb.ChatMessage:
    return pb.ChatMessage(
        id=ids.new_id(), room=room, sender=sender, content=f"message {n}", ts_ms=1_700_000_000_000
    )


async def publish_chat(js: JetStreamContext, messages: list[pb.ChatMessage]) -> None:
    """Publish as the gateway does (to CHAT, which ARCHIVE sources), many at a time."""

    async def one(message: pb.ChatMessage) -> None:
        data, headers = codec.encode(message)
        headers[names.HEADER_MSG_ID] = message.id
        await js.publish(names.room_subject(message.room), data, headers=headers)

    for start in range(0, len(messages), 500):
        await asyncio.gather(*(one(m) for m in messages[start : start + 500]))


async def publish_tasks(js: JetStreamContext, messages: list[pb.ChatMessage]) -> None:
    """Publish directly on archive.tasks as ArchiveTasks."""

    async def one(message: pb.ChatMessage) -> None:
        data, headers = codec.encode(pb.ArchiveTask(message=message))
        headers[names.HEADER_MSG_ID] = message.id
        await js.publish(names.ARCHIVE_TASKS, data, headers=headers)

    for start in range(0, len(messages), 500):
        await asyncio.gather(*(one(m) for m in messages[start : start + 500]))


async def row_ids(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return [r["id"] for r in await conn.fetch("SELECT id FROM messages")]
    finally:
        await conn.close()


async def row_count(database_url: str) -> int:
    """Rows in messages; 0 while the table does not exist or Postgres is down."""
    try:
        conn = await asyncpg.connect(database_url, timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return 0
    try:
        return int(await conn.fetchval("SELECT count(*) FROM messages"))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()
