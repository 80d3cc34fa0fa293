"""Holding a reconnect storm (gateway/replay_cache.py, gateway/admission.py), on real
gateways and NATS: many clients resuming the same rooms share one stream read per room
and still get every message exactly once; hellos beyond the queue are refused with 503 +
Retry-After before the upgrade."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from chatlib.auth import Authenticator, AuthError, Identity
from gateway.admission import TokenCache
from gateway.settings import GatewaySettings
from nats.aio.client import Client as NATS

from tests.gateway_fixtures import (
    ChatClient,
    GatewayProc,
    clients,
    gateways,
    guest_token,
    start_gateways,
)
from tests.waiting import wait_until

__all__ = ["gateways"]

READS = "gateway_replay_stream_reads_total"


async def test_clients_resuming_together_share_the_replay_and_miss_nothing(
    gateways: list[GatewayProc],
) -> None:
    a, b = gateways
    resumers = [f"r{i}" for i in range(20)]
    async with clients(ChatClient.connect(a, "alice", rooms=["dev"])) as (alice,):
        start = alice.welcome["seq"]
        for i in range(10):
            await alice.send_room("dev", f"missed {i}")
        await alice.expect_count(10, type="ack")
        reads_before = b.metric(READS)

        # Messages keep flowing while they all resume on b at once.
        async def keep_sending() -> None:
            for i in range(10):
                await alice.send_room("dev", f"live {i}")
                await asyncio.sleep(0.02)

        sender = asyncio.create_task(keep_sending())
        back = await asyncio.gather(
            *(ChatClient.connect(b, u, rooms=["dev"], resume_seq=start) for u in resumers)
        )
        await sender
        await alice.expect_count(20, type="ack")
        expected = [f"missed {i}" for i in range(10)] + [f"live {i}" for i in range(10)]
        try:
            for client in back:
                await wait_until(
                    lambda c=client: len(c.messages()) >= 20, f"{client.user}: 20 messages", 10
                )
                await client.expect(type="resumed")
                contents = [m["content"] for m in client.messages()]
                assert contents == expected, client.user  # each once, in order
                seqs = [m["seq"] for m in client.messages()]
                assert seqs == sorted(set(seqs))
            # One read per filter (lobby, dev, DMs), not one per client.
            assert b.metric(READS) - reads_before <= 3
        finally:
            for client in back:
                await client.close()


async def test_hellos_beyond_the_queue_are_refused_with_503_and_retry_after(
    nc: NATS, nats_server: Any, logs_dir: Path
) -> None:
    env = {
        "GATEWAY_HELLO_CONCURRENCY": "1",
        "GATEWAY_HELLO_QUEUE": "0",
        "GATEWAY_HELLO_RETRY_AFTER": "3",
        "GATEWAY_HELLO_TIMEOUT": "30",
    }
    with start_gateways(nats_server.url, logs_dir, 1, env) as (gw,):
        # Upgraded but silent: it holds the only place until it says hello.
        waiting = await ChatClient.open(gw, "slow")
        try:
            with pytest.raises(websockets.InvalidStatus) as refused:
                await ChatClient.open(gw, "other")
            assert refused.value.response.status_code == 503
            assert refused.value.response.headers["Retry-After"] == "3"
            assert gw.metric("gateway_hello_refused_total") >= 1
            # Once greeted, the place is free again: the next client gets in.
            token = await asyncio.to_thread(guest_token, gw, "slow")
            await waiting.send({"type": "hello", "v": 1, "token": token})
            await waiting.expect(type="welcome")
            other = await ChatClient.connect(gw, "other")
            await other.close()
        finally:
            await waiting.close()


async def test_token_checks_are_cached_briefly_and_never_past_expiry() -> None:
    settings = GatewaySettings(guest_token_ttl=60)
    auth = Authenticator(settings)
    calls: list[object] = []
    identify = auth.identify

    def counting(token: object) -> Identity:
        calls.append(token)
        return identify(token)

    auth.identify = counting  # type: ignore[method-assign]
    cache = TokenCache(auth, ttl=30)
    token, _ = auth.issue_guest("alice")
    assert (await cache.identify(token)).user == "alice"
    assert (await cache.identify(token)).user == "alice"
    assert len(calls) == 1  # the second check came from the cache
    # A token that expires in 1 s is cached for 1 s, not 30.
    soon, _ = auth.issue_guest("bob", now=time.time() - 59)  # exp in 1 s (ttl 60)
    assert (await cache.identify(soon)).user == "bob"
    assert cache._known[soon][1] <= time.time() + 1
    # Refusals are never cached.
    for _ in range(2):
        with pytest.raises(AuthError):
            await cache.identify("not-a-token")
    assert calls.count("not-a-token") == 2


async def test_a_replay_stops_at_the_snapshot_what_follows_comes_live(js: Any) -> None:
    """A room's log read from the stream can hold messages published after the resuming
    client's snapshot (messages flowing during a storm) that the hub has not handed on
    yet. They reach the socket live; replaying them as well sent them twice (the storm
    bench counted such duplicates)."""
    from chatlib import codec, names, nats_wiring
    from chatlib.proto.chat import v1 as pb
    from chatlib.settings import CommonSettings
    from gateway.replay_cache import SharedReplay

    for config in nats_wiring.stream_configs(CommonSettings()):
        await nats_wiring.ensure_stream(js, config)
    seqs = []
    for i in range(10):
        msg = pb.ChatMessage(room="dev", content=f"m{i}", sender="alice", client_id=f"c{i}")
        payload, headers = codec.encode(msg)
        ack = await js.publish(names.room_subject("dev"), payload, headers=headers)
        seqs.append(ack.seq)
    replay = SharedReplay(js, max_messages=1000, ttl=60.0, backfill=0)
    result = await replay.replay("bob", ["dev"], after=seqs[1], upto=seqs[5], limit=100)
    assert [m.seq for m in result.messages] == seqs[2:6]  # after < seq <= snapshot
    assert result.complete
    # The same log (now read to the stream's end) serves a later snapshot in full.
    later = await replay.replay("carol", ["dev"], after=seqs[1], upto=seqs[9], limit=100)
    assert [m.seq for m in later.messages] == seqs[2:]


def test_the_listening_socket_takes_a_storm_sized_accept_queue(
    nats_server: Any, logs_dir: Path
) -> None:
    """A storm's sockets must be accepted to be greeted or refused with 503: past a full
    accept queue the kernel drops them and the clients come back only on TCP's
    retransmit timers (1, 3, 7, 15, 31 s). The queue is GATEWAY_HTTP_BACKLOG long."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("needs ss (iproute2) to read the listening socket's accept queue")
    with start_gateways(nats_server.url, logs_dir, 1, {"GATEWAY_HTTP_BACKLOG": "3000"}) as (gw,):
        listing = subprocess.run(
            [ss, "-ltnH", f"sport = :{gw.port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        # State, Recv-Q, Send-Q (for a listening socket: its accept queue's length), ...
        # The kernel caps the queue at net.core.somaxconn.
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        assert listing[0] == "LISTEN" and int(listing[2]) == min(3000, somaxconn), listing
    assert GatewaySettings().http_backlog > 2048  # more than uvicorn's own default
