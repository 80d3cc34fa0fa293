"""Crashes under load: the whole system keeps every promise while its parts die one by one.

Clients chat in rooms and DMs (sequence-numbered messages) while, in turn: an archive
replica is SIGKILLed, a gateway is SIGKILLed (its clients reconnect to the other gateway
with resume_seq and recover), presence is killed and restarted, Postgres is killed and
restarted, NATS is restarted, an rpc replica is SIGKILLed. Afterwards:

- every acked message is in Postgres exactly once (and every CHAT message too);
- every client saw every message of its rooms and DMs exactly once, in order;
- each ack names the message the CHAT log holds at that seq;
- a gRPC StreamMessages reader, resuming from its last seq after every end (the rpc
  kill, the NATS restart), saw every message of its rooms exactly once, in order;
- presence says exactly who is connected.

`make test` runs 5,000 messages; `make test-chaos` a longer run (20,000).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from devtools.servers import NatsServer, PostgresServer

from tests.lifecycle_system import USERS as LIFECYCLE_USERS
from tests.lifecycle_system import (
    chat_events,
    check_lifecycle,
    deleted_ids,
    lifecycle_client,
    run_lifecycle,
)
from tests.system_fixtures import (
    ChatSystem,
    GrpcReader,
    LoggedMessage,
    ScoringClient,
    archived_id_counts,
    chat_log,
    create_database,
    ordering_problems,
    who_is_online,
)
from tests.userstate_crash_checks import check_unread_exact, mark_threads_read
from tests.waiting import wait_until

log = logging.getLogger(__name__)

ROOMS = ["dev", "ops"]
USERS = [f"u{i}" for i in range(8)]
# How long an unacked send waits before the client sends it again (same client_id).
RESEND_AFTER = 3.0
WINDOW = 4  # unacked sends per client


def rooms_of(user: str) -> list[str]:
    return ["lobby", ROOMS[int(user[1:]) % len(ROOMS)]]


def dm_peer_of(user: str) -> str:
    i = int(user[1:])
    return USERS[i ^ 1]  # pairs u0-u1, u2-u3, ...


def threads_of(user: str) -> list[str]:
    return [f"room:{r}" for r in rooms_of(user)] + [f"dm:{dm_peer_of(user)}"]


@dataclass
class Load:
    """Clients posting sequence-numbered messages with a window of unacked sends."""

    clients: list[ScoringClient]
    total: int
    rate: float  # messages per second, all clients together
    posted: int = 0
    sent_at: dict[tuple[str, str], float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def acked(self) -> int:
        return sum(len(c.acks) for c in self.clients)

    async def run_client(self, client: ScoringClient, quota: int) -> None:
        rng = random.Random(client.user)
        peer = dm_peer_of(client.user)
        pause = len(self.clients) / self.rate
        for n in range(quota):
            while len(client.unacked) >= WINDOW:
                await self.resend_stale(client)
                await asyncio.sleep(0.05)
            cid = client.next_client_id()
            content = f"{client.user} #{n}"
            if rng.random() < 0.3:
                frame = {"type": "dm", "to": peer, "content": content, "client_id": cid}
            else:
                room = rng.choice(rooms_of(client.user))
                frame = {"type": "send", "room": room, "content": content, "client_id": cid}
            self.sent_at[(client.user, cid)] = time.monotonic()
            await client.post(frame)
            self.posted += 1
            await asyncio.sleep(pause)
        while client.unacked:
            await self.resend_stale(client)
            await asyncio.sleep(0.1)

    async def resend_stale(self, client: ScoringClient) -> None:
        """A send without an ack (error frame, lost socket, NATS down) goes again."""
        now = time.monotonic()
        for cid, frame in list(client.unacked.items()):
            if now - self.sent_at[(client.user, cid)] > RESEND_AFTER and client.connected:
                self.sent_at[(client.user, cid)] = now
                with contextlib.suppress(Exception):
                    await client.send_json(frame)

    async def run(self) -> None:
        share = self.total // len(self.clients)
        await asyncio.gather(*(self.run_client(c, share) for c in self.clients))
        self.done.set()


async def wait_acked(load: Load, target: int, what: str, timeout: float = 60.0) -> None:
    await wait_until(lambda: load.acked >= target, what, timeout=timeout, interval=0.1)


async def crash_run(tmp: Path, total: int, rate: float) -> None:
    """The whole scenario; `total` messages at about `rate` per second."""
    nats_server = await asyncio.to_thread(NatsServer.deployed(tmp / "nats").start)
    pg = await asyncio.to_thread(PostgresServer(tmp / "pg").start)
    database_url = await create_database(pg.url)
    system = ChatSystem([nats_server.url], database_url, tmp / "logs", rpcs=2)
    clients: list[ScoringClient] = []
    life: list[ScoringClient] = []
    supervisors: list[asyncio.Task[None]] = []
    import nats

    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        await asyncio.to_thread(system.start)
        for user in USERS:
            client = ScoringClient(user, rooms_of(user), system.gateway_ws_urls)
            client.keep_frames = False
            client._url_index = USERS.index(user)  # half on each gateway
            await client.connect()
            clients.append(client)
        supervisors = [asyncio.create_task(c.supervise()) for c in clients]
        # Issue 14: edits, deletes and reactions through the same kills.
        life = [
            lifecycle_client(user, system.gateway_ws_urls, i)
            for i, user in enumerate(LIFECYCLE_USERS)
        ]
        for client in life:
            await client.connect()
        supervisors += [asyncio.create_task(c.supervise()) for c in life]
        reader = GrpcReader(system.grpc_addresses, ["lobby", *ROOMS])
        supervisors.append(asyncio.create_task(reader.run()))
        load = Load(clients, total, rate)
        load_task = asyncio.create_task(load.run())
        life_task = asyncio.create_task(run_lifecycle(life, load.done))
        step = total // 7

        async def fault(name: str, action: Callable[[], Awaitable[None] | None], at: int) -> None:
            await wait_acked(load, at, f"{at} acks before: {name}")
            log.warning("fault: %s at %d acks", name, load.acked)
            started = time.monotonic()
            result = action()
            if result is not None:
                await result
            # The system keeps going: more acks after the fault than before it.
            more = min(load.acked + step // 4, load.total)
            await wait_acked(load, more, f"progress after: {name}")
            log.warning("fault: %s recovered in %.1fs", name, time.monotonic() - started)

        await wait_acked(load, step // 2, "some traffic before the reads")
        markers = await mark_threads_read(clients, database_url)  # user state (#13)
        await fault("SIGKILL archive-0", lambda: system.kill("archive-0"), step)

        gateway0_users = [c.user for c in clients if c.ws and _port_of(c) == _gw_port(system, 0)]
        assert gateway0_users, "gateway-0 has no clients: killing it would prove nothing"
        await fault("SIGKILL gateway-0", lambda: system.kill("gateway-0"), 2 * step)
        await wait_until(
            lambda: all(c.connected for c in clients), "every client back on a gateway", 20
        )
        await check_unread_exact(
            nc, system.gateway_ws_urls(), clients, markers, "after archive + gateway SIGKILL"
        )
        # Bring the crashed ones back so the rest of the run has two of each again.
        await asyncio.to_thread(system.restart, "gateway-0")
        await asyncio.to_thread(system.restart, "archive-0")

        async def presence_restart() -> None:
            system.kill("presence-0")
            await asyncio.to_thread(system.restart, "presence-0")
            await asyncio.to_thread(system.restart, "presence-1")

        await fault("presence kill + restart", presence_restart, 3 * step)

        async def postgres_restart() -> None:
            await asyncio.to_thread(pg.kill)
            await asyncio.to_thread(pg.start)

        await fault("Postgres SIGKILL + restart", postgres_restart, 4 * step)
        await fault("NATS restart", lambda: asyncio.to_thread(nats_server.restart), 5 * step)
        await fault(
            "SIGKILL the gRPC reader's rpc replica",
            lambda: system.kill(system.rpc_at(reader.current)),
            6 * step,
        )

        await asyncio.wait_for(load_task, timeout=120)
        life_counts = await asyncio.wait_for(life_task, timeout=120)
        await check_outcome(system, nc, clients, database_url, gateway0_users, life)
        await check_grpc_reader(nc, reader)
        await check_lifecycle(nc, life, database_url, life_counts)
        await check_unread_exact(nc, system.gateway_ws_urls(), clients, markers, "at the end")
    finally:
        for task in supervisors:
            task.cancel()
        for client in [*clients, *life]:
            with contextlib.suppress(Exception):
                await client.close()
        await nc.close()
        await asyncio.to_thread(system.stop)
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(pg.stop)


def _port_of(client: ScoringClient) -> int:
    assert client.ws is not None
    return int(client.ws.remote_address[1])


def _gw_port(system: ChatSystem, index: int) -> int:
    return system.procs[f"gateway-{index}"].http_port


async def check_outcome(
    system: ChatSystem,
    nc: object,
    clients: list[ScoringClient],
    database_url: str,
    gateway0_users: list[str],
    others: list[ScoringClient] = [],  # noqa: B006 - read only
) -> None:
    from nats.aio.client import Client as NATS

    assert isinstance(nc, NATS)
    logged: list[LoggedMessage] = await chat_log(nc)
    by_seq = {m.seq: m for m in logged}
    ids = [m.id for m in logged]
    assert len(ids) == len(set(ids)), "a message id appears twice in the CHAT log"
    # Nothing acked twice under two sequences, each ack names what the log holds.
    for client in clients:
        for cid, (mid, seq) in client.acks.items():
            assert seq in by_seq and by_seq[seq].id == mid, (client.user, cid, mid, seq)
            assert by_seq[seq].client_id == cid and by_seq[seq].sender == client.user
    sent = {(m.sender, m.client_id) for m in logged}
    assert len(sent) == len(logged), "a retried send was stored twice"

    # Every client saw every message of its threads exactly once, in order.
    async def clients_converged() -> list[str] | bool:
        problems = [p for c in clients for p in ordering_problems(c, logged, threads_of(c.user))]
        return not problems or problems

    result = await _wait_for(clients_converged, 20)
    assert result is True, "\n".join(result)  # type: ignore[arg-type]
    assert all(c.reconnects >= 1 for c in clients if c.user in gateway0_users), (
        "gateway-0's clients did not reconnect"
    )

    # Postgres: every CHAT message (so every acked one) exactly once, nothing else.
    # Deleted messages are tombstones in Postgres, removed from CHAT (issue 14).
    purged = deleted_ids(await chat_events(nc))

    async def archived() -> bool:
        counts = await archived_id_counts(database_url)
        return set(counts) == set(ids) | purged

    await wait_until(archived, "every logged message archived", timeout=60, interval=0.5)
    counts = await archived_id_counts(database_url)
    assert all(n == 1 for n in counts.values()), "a message was archived twice"

    # Presence: exactly the connected users.
    expected = sorted(c.user for c in [*clients, *others] if c.connected)

    async def presence_exact() -> bool:
        try:
            return await who_is_online(nc) == expected
        except Exception:
            return False

    await wait_until(presence_exact, f"presence shows exactly {expected}", timeout=20)


async def check_grpc_reader(nc: object, reader: GrpcReader) -> None:
    """The gRPC reader holds exactly the CHAT log's messages of its rooms, in order."""
    from nats.aio.client import Client as NATS

    assert isinstance(nc, NATS)
    subjects = {f"chat.room.{r}" for r in reader.rooms}
    expected = [m.seq for m in await chat_log(nc) if m.subject in subjects]
    await wait_until(lambda: reader.seqs[-1:] == expected[-1:], "the gRPC reader caught up", 20)
    assert reader.seqs == expected, "the gRPC reader has a gap, a duplicate or a reorder"
    # It did resume: once at the NATS restart, once at the rpc kill (at least).
    assert len(reader.ends) >= 2, reader.ends


async def _wait_for(check: Callable[[], Awaitable[list[str] | bool]], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result is True or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.25)


async def test_crashes_under_load_lose_nothing_acked_and_clients_recover_exactly(
    tmp_path: Path,
) -> None:
    await crash_run(tmp_path, total=5000, rate=150)


@pytest.mark.chaos
async def test_twenty_thousand_messages_through_every_crash_arrive_exactly_once(
    tmp_path: Path,
) -> None:
    await crash_run(tmp_path, total=20000, rate=200)
