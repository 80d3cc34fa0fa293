"""A 3-node NATS cluster (routes, every stream replicated x3) loses a node under load:
no acked message is lost, clients keep chatting, the archive still gets everything once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import nats
from chatlib import names
from devtools.servers import PostgresServer

from tests.system_fixtures import (
    ChatSystem,
    ScoringClient,
    create_database,
    drop_database,
    start_nats_cluster,
)
from tests.test_system_crashes import USERS, Load, check_outcome, rooms_of, wait_acked

log = logging.getLogger(__name__)


async def test_a_three_node_cluster_losing_the_stream_leader_loses_no_acked_message(
    tmp_path: Path, pg_server: PostgresServer
) -> None:
    servers = await start_nats_cluster(tmp_path / "cluster")
    urls = [s.url for s in servers]
    database_url = await create_database(pg_server.url)
    system = ChatSystem(urls, database_url, tmp_path / "logs", stream_replicas=3)
    nc = await nats.connect(servers=urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    clients: list[ScoringClient] = []
    supervisors: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(system.start)
        info = await nc.jetstream().stream_info(names.STREAM_CHAT)
        assert info.config.num_replicas == 3
        for i, user in enumerate(USERS[:6]):
            client = ScoringClient(user, rooms_of(user), system.gateway_ws_urls)
            client.keep_frames = False
            client._url_index = i
            await client.connect()
            clients.append(client)
        supervisors = [asyncio.create_task(c.supervise()) for c in clients]
        load = Load(clients, total=600, rate=50)
        load_task = asyncio.create_task(load.run())

        await wait_acked(load, 200, "200 acks before losing a node")
        # Kill the node leading the CHAT stream: the hardest one to lose.
        leader = (await nc.jetstream().stream_info(names.STREAM_CHAT)).cluster.leader  # type: ignore[union-attr]
        victim = next(s for s in servers if f"server_name: {leader}\n" in (s.config or ""))
        log.warning("killing NATS node %s (CHAT leader)", leader)
        await asyncio.to_thread(victim.kill)
        await wait_acked(load, load.acked + 100, "clients keep chatting on two nodes", 60)

        await asyncio.wait_for(load_task, timeout=120)
        await check_outcome(system, nc, clients, database_url, [])
    finally:
        for task in supervisors:
            task.cancel()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        await nc.close()
        await asyncio.to_thread(system.stop)
        for server in servers:
            await asyncio.to_thread(server.stop)
        await drop_database(pg_server.url, database_url)
