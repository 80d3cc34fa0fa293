"""Network faults between the services and NATS / Postgres: every service reaches NATS and
the archive reaches Postgres through a TCP proxy that resets, stalls and delays their
connections while clients chat. Nothing acked is lost, nothing is written twice, every
client sees every message once and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import nats
from devtools.servers import NatsServer, PostgresServer

from tests.system_fixtures import ChatSystem, ScoringClient, create_database, drop_database
from tests.tcp_proxy import TcpProxy
from tests.test_system_crashes import USERS, Load, check_outcome, rooms_of, wait_acked

log = logging.getLogger(__name__)


async def test_resets_stalls_and_delays_to_nats_and_postgres_lose_nothing(
    tmp_path: Path, pg_server: PostgresServer
) -> None:
    nats_server = await asyncio.to_thread(NatsServer(tmp_path / "nats").start)
    nats_proxy = TcpProxy(nats_server.port).start()
    pg_proxy = TcpProxy(pg_server.port).start()
    database_url = await create_database(pg_server.url)
    proxied_db = database_url.replace(f":{pg_server.port}/", f":{pg_proxy.port}/")
    system = ChatSystem([f"nats://{nats_proxy.url_host_port}"], proxied_db, tmp_path / "logs")
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    clients: list[ScoringClient] = []
    supervisors: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(system.start)
        for i, user in enumerate(USERS[:6]):
            client = ScoringClient(user, rooms_of(user), system.gateway_ws_urls)
            client.keep_frames = False
            client._url_index = i
            await client.connect()
            clients.append(client)
        supervisors = [asyncio.create_task(c.supervise()) for c in clients]
        load = Load(clients, total=840, rate=40)
        load_task = asyncio.create_task(load.run())
        step = 100

        async def fault(name: str, apply: object, heal: object, hold: float, at: int) -> None:
            await wait_acked(load, at, f"{at} acks before {name}")
            log.warning("fault: %s", name)
            await asyncio.to_thread(apply)  # type: ignore[arg-type]
            await asyncio.sleep(hold)  # the fault lasts this long: the point of the test
            if heal is not None:
                await asyncio.to_thread(heal)  # type: ignore[arg-type]
            started = time.monotonic()
            more = min(load.acked + 20, load.total)  # chat goes on (the archive catches up later)
            await wait_acked(load, more, f"progress after {name}", timeout=60)
            log.warning("fault: %s healed, progress in %.1fs", name, time.monotonic() - started)

        await fault("NATS reset", nats_proxy.reset_once, None, 0, step)
        await fault("NATS stall 3s", nats_proxy.stall, nats_proxy.set_pass, 3, 2 * step)
        await fault("NATS delay 50ms", lambda: nats_proxy.set_pass(0.05), nats_proxy.set_pass,
                    3, 3 * step)  # fmt: skip
        await fault("Postgres reset", pg_proxy.reset_once, None, 0, 4 * step)
        await fault("Postgres cut 3s", pg_proxy.cut, pg_proxy.set_pass, 3, 5 * step)
        await fault("Postgres stall 3s", pg_proxy.stall, pg_proxy.set_pass, 3, 6 * step)

        await asyncio.wait_for(load_task, timeout=120)
        assert nats_proxy.accepted > 6, "services never reconnected through the proxy"
        await check_outcome(system, nc, clients, database_url, [])
    finally:
        for task in supervisors:
            task.cancel()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        await nc.close()
        await asyncio.to_thread(system.stop)
        nats_proxy.stop()
        pg_proxy.stop()
        await asyncio.to_thread(nats_server.stop)
        await drop_database(pg_server.url, database_url)
