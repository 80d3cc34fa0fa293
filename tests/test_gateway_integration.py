"""The gateway with the real presence and archive services (all real processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
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
