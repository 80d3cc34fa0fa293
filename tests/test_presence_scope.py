"""Scoped presence (gateway/scope.py) with real gateways, real presence replicas, real NATS:
a user's online/offline reaches exactly the sockets that share a small room with them or
watch them, once per transition; `members` pages a room with online flags."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from tests.gateway_fixtures import ChatClient, GatewayProc, clients, start_gateways
from tests.presence_fixtures import PresenceReplicas, presence_replicas
from tests.waiting import wait_until

__all__ = ["presence_replicas"]

# Rooms with more members than this do not push presence. The lobby's members are the
# users online: with the fillers below online it is "big", so only real rooms and watch
# lists carry presence, which is what the test is about.
ROOM_MAX = 3


@pytest.fixture
def scoped_gateways(nc: NATS, nats_server: Any, logs_dir: Path) -> Iterator[list[GatewayProc]]:
    env = {"GATEWAY_PRESENCE_ROOM_MAX": str(ROOM_MAX), "GATEWAY_WATCH_MAX": "4"}
    with start_gateways(nats_server.url, logs_dir, 2, env) as gws:
        yield gws


def presence_of(client: ChatClient, user: str) -> list[bool]:
    return [f["online"] for f in client.matching(type="presence", user=user)]


async def settled(client: ChatClient) -> None:
    """Every frame the gateway pushed to this socket before now has arrived: a pong
    answers after them (one socket's frames keep their order)."""
    before = len(client.matching(type="pong"))
    await client.send({"type": "ping"})
    await client.expect_count(before + 1, type="pong")


async def test_presence_reaches_exactly_room_members_and_watchers_once_per_transition(
    presence_replicas: PresenceReplicas, scoped_gateways: list[GatewayProc]
) -> None:
    presence_replicas.start(2)  # two replicas: still one event per transition
    a, b = scoped_gateways
    fillers = [await ChatClient.connect(gw, f"filler{i}") for i, gw in enumerate([a, b, a, b])]
    # bob was a member of dev before (membership outlives a connection).
    first = await ChatClient.connect(b, "bob", rooms=["dev"])
    await first.close()
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]),
        ChatClient.connect(a, "carol", rooms=["ops"]),
        ChatClient.connect(b, "erin", rooms=["dev"]),
    ) as (alice, carol, erin):
        dave = await ChatClient.connect(b, "dave")
        await dave.send({"type": "watch", "users": ["bob"]})
        await dave.expect(type="presence", user="bob", online=False)  # the current state

        bob = await ChatClient.connect(b, "bob", rooms=["dev"])
        # Members of dev (both gateways) and the watcher hear it...
        for client in (alice, erin):
            await client.expect(type="presence", user="bob", online=True)
        await dave.expect(type="presence", user="bob", online=True)
        # ... and nobody else: carol shares no small room, the lobby is big.
        for client in (carol, *fillers):
            await settled(client)
            assert presence_of(client, "bob") == [], client.user
        # bob's welcome names the online members of his small rooms, not the lobby.
        assert bob.welcome["online"] == ["alice", "bob", "erin"]

        members = await _members(alice, "dev")
        assert members["members"] == [
            {"user": "alice", "online": True},
            {"user": "bob", "online": True},
            {"user": "erin", "online": True},
        ]
        assert members["total"] == 3 and members["next_after"] == ""

        await bob.close()
        for client in (alice, erin, dave):
            await client.expect(type="presence", user="bob", online=False)
        for client in (alice, erin, carol, *fillers):
            await settled(client)
        # Exactly once per transition, with two presence replicas.
        assert presence_of(alice, "bob") == [True, False]
        assert presence_of(erin, "bob") == [True, False]
        assert presence_of(dave, "bob") == [False, True, False]
        for client in (carol, *fillers):
            assert presence_of(client, "bob") == [], client.user
        # Membership outlives the connection: bob is listed, offline.
        members = await _members(alice, "dev")
        assert {"user": "bob", "online": False} in members["members"]
        await dave.close()
    for filler in fillers:
        await filler.close()


async def test_a_new_member_of_a_room_is_announced_to_its_members(
    presence_replicas: PresenceReplicas, scoped_gateways: list[GatewayProc]
) -> None:
    presence_replicas.start(1)
    a, b = scoped_gateways
    fillers = [await ChatClient.connect(gw, f"filler{i}") for i, gw in enumerate([a, b, a, b])]
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]), ChatClient.connect(b, "bob")
    ) as (alice, bob):
        await settled(alice)
        assert presence_of(alice, "bob") == []  # the lobby is big: not pushed
        await bob.send({"type": "join", "room": "dev"})
        await alice.expect(type="presence", user="bob", online=True)
        await bob.send({"type": "leave", "room": "dev"})
        await bob.expect(type="left", room="dev")

        async def bob_gone() -> bool:
            page = await _members(alice, "dev")
            return [m["user"] for m in page["members"]] == ["alice"]

        await wait_until(bob_gone, "bob no longer a member of dev", timeout=10)
    for filler in fillers:
        await filler.close()


async def test_members_pages_and_refuses_bad_requests(
    presence_replicas: PresenceReplicas, scoped_gateways: list[GatewayProc]
) -> None:
    presence_replicas.start(1)
    a = scoped_gateways[0]
    names = [f"user{i}" for i in range(5)]
    async with clients(*(ChatClient.connect(a, n, rooms=["big"]) for n in names)) as users:
        first = await _members(users[0], "big", limit=2)
        assert [m["user"] for m in first["members"]] == ["user0", "user1"]
        assert first["total"] == 5 and first["next_after"] == "user1"
        second = await _members(users[0], "big", limit=2, after="user1")
        assert [m["user"] for m in second["members"]] == ["user2", "user3"]
        last = await _members(users[0], "big", limit=2, after="user3")
        assert [m["user"] for m in last["members"]] == ["user4"] and last["next_after"] == ""
        # The lobby's members are the users online, paged the same way.
        lobby = await _members(users[0], "lobby")
        assert [m["user"] for m in lobby["members"]] == names

        u = users[0]
        for bad, code in [
            ({"type": "members", "room": "nope"}, "not_joined"),
            ({"type": "members", "room": "Bad Room"}, "bad_room"),
            ({"type": "members", "room": "big", "limit": 0}, "bad_frame"),
            ({"type": "members", "room": "big", "after": 7}, "bad_frame"),
            ({"type": "watch", "users": "bob"}, "bad_frame"),
            ({"type": "watch", "users": ["a", "b", "c", "d", "e"]}, "watch_too_large"),
            ({"type": "watch", "users": ["Not A Name"]}, "bad_user"),
        ]:
            before = len(u.matching(type="error", code=code))
            await u.send(bad)
            await u.expect_count(before + 1, type="error", code=code)
        # A refused watch changed nothing: the previous (empty) list stands.
        await settled(u)
        assert u.matching(type="presence", user="a") == []


async def _members(client: ChatClient, room: str, **request: Any) -> dict[str, Any]:
    before = len(client.matching(type="members", room=room))
    await client.send({"type": "members", "room": room, **request})
    frames = await client.expect_count(before + 1, type="members", room=room)
    return frames[before]


BATCH = {"presence_batch": True}


def transitions(client: ChatClient, user: str) -> list[bool]:
    """`user`'s changes as this socket saw them, from `presence` and `presence_batch`."""
    seen: list[bool] = []
    for f in client.frames:
        if f.get("type") == "presence" and f.get("user") == user:
            seen.append(f["online"])
        elif f.get("type") == "presence_batch":
            assert user not in f["online"] or user not in f["offline"]
            if user in f["online"] or user in f["offline"]:
                seen.append(user in f["online"])
    return seen


@pytest.fixture
def batching_gateways(nc: NATS, nats_server: Any, logs_dir: Path) -> Iterator[list[GatewayProc]]:
    # dev has 4 members here (the lobby, with the fillers, 9 online: still big). A long
    # interval, so that quick flips fall within one batch.
    env = {"GATEWAY_PRESENCE_ROOM_MAX": "5", "GATEWAY_PRESENCE_BATCH_MS": "1000"}
    with start_gateways(nats_server.url, logs_dir, 2, env) as gws:
        yield gws


async def test_batched_presence_reaches_exactly_room_members_once_per_transition(
    presence_replicas: PresenceReplicas, batching_gateways: list[GatewayProc]
) -> None:
    presence_replicas.start(2)  # two replicas: still one change per transition
    a, b = batching_gateways
    fillers = [await ChatClient.connect(gw, f"filler{i}") for i, gw in enumerate([a, b, a, b])]
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"], hello_extra=BATCH),
        ChatClient.connect(b, "erin", rooms=["dev"], hello_extra=BATCH),
        ChatClient.connect(a, "carol", rooms=["ops"], hello_extra=BATCH),
        # A v1 client (no presence_batch) in the same room keeps its presence frames.
        ChatClient.connect(b, "frank", rooms=["dev"]),
    ) as (alice, erin, carol, frank):
        bob = await ChatClient.connect(b, "bob", rooms=["dev"])
        # (The batch may also carry the others of dev coming online just before.)
        for client in (alice, erin, frank):
            await wait_until(lambda c=client: transitions(c, "bob") == [True], f"{client.user}")
        # One timer sends every pending batch of a gateway at once: alice's came, so
        # carol's would have too (same gateway); a pong then follows anything pushed.
        for client in (carol, *fillers):
            await settled(client)
            assert transitions(client, "bob") == [], client.user

        # Offline, online, offline well within one interval: each transition still
        # arrives once and in order (a flip ends the pending batch early).
        await bob.close()
        bob = await ChatClient.connect(b, "bob", rooms=["dev"])
        # frank (unbatched) sees each change at once: bob is online again before he goes.
        await wait_until(lambda: transitions(frank, "bob") == [True, False, True], "bob back")
        await bob.close()
        for client in (alice, erin, frank):
            await wait_until(
                lambda c=client: len(transitions(c, "bob")) >= 4, f"{client.user}: 4 changes"
            )
        for client in (alice, erin, frank, carol, *fillers):
            await settled(client)
        for client in (alice, erin, frank):
            assert transitions(client, "bob") == [True, False, True, False], client.user
        for client in (alice, erin):
            assert client.matching(type="presence", user="bob") == [], "batched: no single frames"
        for client in (carol, *fillers):
            assert transitions(client, "bob") == [], client.user
    for filler in fillers:
        await filler.close()
