"""The harness itself: real servers that tests can stop, kill and restart in place."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import nats
import pytest
from devtools.servers import NatsServer, PostgresServer

from tests.waiting import wait_until


async def test_embedded_nats_keeps_jetstream_data_across_kill_and_restart(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        ack = await js.publish("t.x", b"kept")
        server.kill()
        server.start()  # same port, same store dir

        async def stored() -> bytes | None:
            try:
                return (await js.get_msg("T", ack.seq)).data
            except nats.errors.Error:
                return None  # still reconnecting

        assert await wait_until(stored, "message readable after restart") == b"kept"
        await nc.close()
    finally:
        server.stop()


async def test_embedded_postgres_survives_kill_and_restart_on_the_same_port(
    tmp_path: Path,
) -> None:
    server = PostgresServer(tmp_path / "pg").start()
    port = server.port
    try:
        conn = await asyncpg.connect(server.url)
        await conn.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42)")
        await conn.close()
        server.kill()
        with pytest.raises(OSError):
            await asyncpg.connect(server.url, timeout=2)
        server.start()
        assert server.port == port
        conn = await asyncpg.connect(server.url)
        assert await conn.fetchval("SELECT v FROM t") == 42
        await conn.close()
    finally:
        server.stop()


async def test_each_test_gets_a_fresh_empty_database(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    tables = await conn.fetchval(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
    )
    await conn.close()
    assert tables == 0
