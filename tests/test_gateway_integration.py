"""The gateway with the real presence and archive services (all real processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
from chatlib import names
from nats.aio.client import Client as NATS

from tests.archive_fixtures import ArchiveProc, archive_db, archive_procs, start_archive
from tests.gateway_fixtures import ChatClient, GatewayProc, clients, gateways
from tests.presence_fixtures import PresenceReplicas, presence_replicas
from tests.waiting import wait_until

__all__ = ["archive_db", "archive_procs", "gateways", "presence_replicas"]


async def test_users_see_who_is_online_across_gateways(
    presence_replicas: PresenceReplicas, gateways: list[GatewayProc]
) -> None:
    presence_replicas.start(1)
    a, b = gateways
    async with clients(ChatClient.connect(a, "alice")) as (alice,):
        bob = await ChatClient.connect(b, "bob")
        await alice.expect(type="presence", user="bob", online=True)
        assert bob.welcome["online"] == ["alice", "bob"]
        assert not bob.matching(type="error", code="presence_unavailable")
        await bob.close()
        await alice.expect(type="presence", user="bob", online=False)


async def _history(client: ChatClient, **request: Any) -> dict[str, Any]:
    before = len(client.matching(type="history"))
    await client.send({"type": "history", **request})
    frames = await client.expect_count(before + 1, type="history")
    return frames[before]


async def test_history_pages_back_through_the_archive_and_dm_threads_stay_private(
    gateways: list[GatewayProc],
    nats_server: Any,
    database_url: str,
    archive_db: asyncpg.Pool,
    archive_procs: list[ArchiveProc],
    logs_dir: Path,
    nc: NATS,
) -> None:
    start_archive(archive_procs, nats_server.url, database_url, logs_dir)
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]),
        ChatClient.connect(b, "bob"),
        ChatClient.connect(b, "carol"),
    ) as (alice, bob, carol):
        for i in range(5):
            await alice.send_room("dev", f"m{i}")
        await alice.send_dm("bob", "secret")
        await alice.expect_count(6, type="ack")

        async def archived() -> bool:
            page = await _history(alice, room="dev", limit=3)
            return len(page["messages"]) == 3 and page["messages"][-1]["content"] == "m4"

        await wait_until(archived, "messages archived", timeout=15, interval=0.2)
        latest = await _history(alice, room="dev", limit=3)
        assert [m["content"] for m in latest["messages"]] == ["m2", "m3", "m4"]
        assert latest["has_more"] is True and latest["room"] == "dev"
        older = await _history(alice, room="dev", limit=3, before=latest["messages"][0]["id"])
        assert [m["content"] for m in older["messages"]] == ["m0", "m1"]
        assert older["has_more"] is False

        async def dm_archived() -> bool:
            page = await _history(bob, **{"with": "alice"})
            return [m["content"] for m in page["messages"]] == ["secret"]

        await wait_until(dm_archived, "dm archived", timeout=15, interval=0.2)
        # The requester is the token's user: carol asking about alice sees only her own
        # thread with alice (empty), never alice's thread with bob.
        page = await _history(carol, **{"with": "alice"})
        assert page["messages"] == [] and page["with"] == "alice"


async def test_a_reused_client_id_replays_a_true_retry_and_refuses_another_message_across_a_crash(
    gateways: list[GatewayProc],
    nats_server: Any,
    database_url: str,
    archive_db: asyncpg.Pool,
    archive_procs: list[ArchiveProc],
    logs_dir: Path,
    nc: NATS,
) -> None:
    """Issue 20: a client_id names one request. The same request again (even through the
    other gateway after the first was SIGKILLed) is acked as a replay with the original's
    id and seq; the same key with another target or content is idempotency_conflict on
    either gateway, and is neither stored, archived nor delivered."""
    start_archive(archive_procs, nats_server.url, database_url, logs_dir)
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]),
        ChatClient.connect(b, "bob", rooms=["dev"]),
    ) as (alice, bob):
        await alice.send_room("lobby", "A", client_id="k1")
        first = await alice.expect(type="ack", client_id="k1")
        assert "duplicate" not in first
        # The same gateway: another room, then the same room with other content.
        await alice.send_room("dev", "B", client_id="k1")
        await alice.send_room("lobby", "A, edited", client_id="k1")
        # The same words as a reply are another request too.
        reply = {"type": "send", "room": "lobby", "content": "A", "client_id": "k1"}
        await alice.send({**reply, "reply_to": first["id"]})
        conflicts = await alice.expect_count(3, type="error", code="idempotency_conflict")
        assert all(e["ref"] == "k1" and e["message"] for e in conflicts)
        assert len(alice.matching(type="ack")) == 1
        assert a.metric("gateway_idempotency_conflicts_total") == 3

        # Gateway a dies; only JetStream remembers what k1 was used for.
        a.proc.kill()
        await alice.expect_closed()
        alice_b = await ChatClient.connect(b, "alice", rooms=["dev"])
        try:
            await alice_b.send_room("lobby", "A", client_id="k1")
            replay = await alice_b.expect(type="ack", client_id="k1")
            assert replay["duplicate"] is True
            assert (replay["id"], replay["seq"], replay["ts"]) == (
                first["id"],
                first["seq"],
                first["ts"],
            )
            await alice_b.send_room("dev", "B", client_id="k1")
            await alice_b.send_dm("bob", "A", client_id="k1")  # same content, another target
            await alice_b.expect_count(2, type="error", code="idempotency_conflict")
            assert len(alice_b.matching(type="ack")) == 1
            assert b.metric("gateway_idempotency_conflicts_total") == 2
            assert b.metric("gateway_duplicate_sends_total") == 1

            marker = await alice_b.send_room("lobby", "marker")
            await alice_b.expect(type="ack", client_id=marker)
            await bob.expect(type="message", content="marker")
            await alice_b.expect(type="message", content="marker")
        finally:
            await alice_b.close()
        # Delivered: "A" once, nothing of the refused requests, to anyone.
        assert [m["content"] for m in bob.messages()] == ["A", "marker"]
        assert [m["content"] for m in alice_b.messages()] == ["marker"]
        info = await nc.jetstream().stream_info(names.STREAM_CHAT)
        assert info.state.messages == 2

        async def archived() -> list[str]:
            rows = await archive_db.fetch("SELECT content FROM messages ORDER BY id")
            contents = [r["content"] for r in rows]
            return contents if "marker" in contents else []

        contents = await wait_until(archived, "marker archived", timeout=15, interval=0.2)
        assert contents == ["A", "marker"]
