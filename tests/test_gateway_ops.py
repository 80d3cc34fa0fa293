"""Operating the gateway: slow clients are cut off, probes, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from tests.gateway_fixtures import (
    ChatClient,
    GatewayProc,
    StalledClient,
    clients,
    gateways,
    start_gateways,
)
from tests.waiting import wait_until

__all__ = ["gateways"]


async def test_a_client_that_stops_reading_is_cut_off_while_others_keep_receiving(
    nc: NATS, nats_server: Any, logs_dir: Path
) -> None:
    env = {
        "GATEWAY_SEND_QUEUE_FRAMES": "16",
        "GATEWAY_RATE_PER_SECOND": "10000",
        "GATEWAY_RATE_BURST": "10000",
        # Big messages, so that the kernel's socket buffers (megabytes) fill quickly.
        "GATEWAY_MAX_CONTENT_BYTES": "60000",
    }
    with start_gateways(nats_server.url, logs_dir, 1, env) as (gw,):
        stalled = StalledClient(gw, "sloth", ["lobby"]).start()
        try:
            async with clients(ChatClient.connect(gw, "alice"), ChatClient.connect(gw, "bob")) as (
                alice,
                bob,
            ):
                await wait_until(lambda: gw.metric("gateway_connections") == 3, "three sockets", 5)
                count = 150
                for i in range(count):
                    await alice.send_room("lobby", f"{i:04d}" + "z" * 59000)
                got = await bob.expect_count(count, type="message", sender="alice", timeout=20)
                assert [m["content"][:4] for m in got] == [f"{i:04d}" for i in range(count)]
                await wait_until(
                    lambda: gw.metric("gateway_slow_client_disconnects_total") == 1,
                    "the stalled client was cut off",
                )
                await wait_until(lambda: gw.metric("gateway_connections") == 2, "socket gone")
                tail = await asyncio.to_thread(stalled.drain_until_closed)
                assert len(tail) < count * 59000  # it never got everything: it was cut off
        finally:
            stalled.close()


async def test_probes_and_metrics_describe_the_gateway(gateways: list[GatewayProc]) -> None:
    gw = gateways[0]
    assert gw.proc.probe("/healthz") == 200
    assert gw.proc.probe("/readyz") == 200
    async with clients(ChatClient.connect(gw, "alice")) as (alice,):
        await alice.send_room("lobby", "counted")
        await alice.expect(type="message", content="counted")
        assert gw.metric("gateway_connections") == 1
        assert gw.metric("gateway_frames_in_total", 'type="send"') == 1
        assert gw.metric("gateway_frames_out_total") >= 3  # welcome, ack, message
        assert gw.metric("gateway_fanout_latency_seconds_count") == 1
    await wait_until(lambda: gw.metric("gateway_connections") == 0, "connection counted down")


async def test_shutdown_closes_sockets_with_going_away_and_exits_cleanly(
    gateways: list[GatewayProc],
) -> None:
    a, b = gateways
    async with clients(ChatClient.connect(a, "alice"), ChatClient.connect(b, "bob")) as (
        alice,
        bob,
    ):
        code = await asyncio.to_thread(a.proc.terminate, 15)
        assert code == 0
        assert await alice.expect_closed() == 1001
        # The other gateway is untouched.
        await bob.send_room("lobby", "still here")
        await bob.expect(type="ack")
        assert bob.close_code is None
