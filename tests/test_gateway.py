"""Two real gateway processes on a real NATS: rooms, DMs, durable sends, recovery."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from chatlib import codec, ids, names
from chatlib.proto.chat import v1 as pb
from nats.aio.client import Client as NATS

from tests.gateway_fixtures import ChatClient, GatewayProc, clients, gateways, start_gateways

__all__ = ["gateways"]


async def test_alice_on_one_gateway_and_bob_on_another_chat_in_a_room(
    gateways: list[GatewayProc],
) -> None:
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]), ChatClient.connect(b, "bob", rooms=["dev"])
    ) as (alice, bob):
        assert alice.welcome["user"] == "alice"
        assert alice.welcome["rooms"] == ["dev", "lobby"]
        cid = await alice.send_room("dev", "hi bob")
        ack = await alice.expect(type="ack", client_id=cid)
        got = await bob.expect(type="message", room="dev")
        assert got["sender"] == "alice" and got["content"] == "hi bob"
        assert got["id"] == ack["id"] and got["seq"] == ack["seq"] and got["ts"] == ack["ts"]
        assert "client_id" not in got
        # The sender's own session gets the message back, with its client_id.
        own = await alice.expect(type="message", id=ack["id"])
        assert own["client_id"] == cid

        for i in range(10):
            await bob.send_room("dev", f"reply {i}")
        await alice.expect_count(10, type="message", sender="bob")
        await bob.expect_count(10, type="ack")
        contents = [m["content"] for m in alice.messages(sender="bob")]
        assert contents == [f"reply {i}" for i in range(10)]  # once each, in order
        seqs = [m["seq"] for m in alice.messages(room="dev")]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)) == 11


async def test_a_room_message_reaches_only_members_of_that_room(
    gateways: list[GatewayProc],
) -> None:
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]),
        ChatClient.connect(b, "bob", rooms=["ops"]),
        ChatClient.connect(b, "carol", rooms=["dev"]),
    ) as (alice, bob, carol):
        await alice.send_room("dev", "dev only")
        await carol.expect(type="message", content="dev only")
        await alice.send_room("lobby", "everyone")
        await bob.expect(type="message", content="everyone", room="lobby")
        assert not bob.messages(room="dev")
        # Joining later works, and leaving stops delivery.
        await bob.send({"type": "join", "room": "dev"})
        await bob.expect(type="joined", room="dev")
        await alice.send_room("dev", "welcome bob")
        await bob.expect(type="message", content="welcome bob")
        await carol.send({"type": "leave", "room": "dev"})
        await carol.expect(type="left", room="dev")
        await alice.send_room("dev", "after carol left")
        await bob.expect(type="message", content="after carol left")
        await alice.send_room("lobby", "marker")
        await carol.expect(type="message", content="marker")
        assert not carol.messages(content="after carol left")


async def test_the_lobby_cannot_be_left(gateways: list[GatewayProc]) -> None:
    """README: `lobby` is always joined; a `leave` of it is refused and changes nothing."""
    a, b = gateways
    async with clients(ChatClient.connect(a, "alice"), ChatClient.connect(b, "bob")) as (
        alice,
        bob,
    ):
        await alice.send({"type": "leave", "room": "lobby"})
        refused = await alice.expect(type="error", code="bad_room")
        assert refused["ref"] == "leave"
        assert not alice.matching(type="left")
        await bob.send_room("lobby", "still here?")
        await alice.expect(type="message", content="still here?", room="lobby")


async def test_a_dm_reaches_every_session_of_the_recipient_and_the_senders_other_sessions(
    gateways: list[GatewayProc],
) -> None:
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice"),
        ChatClient.connect(b, "alice"),
        ChatClient.connect(b, "bob"),
        ChatClient.connect(a, "bob"),
        ChatClient.connect(a, "carol"),
    ) as (alice_a, alice_b, bob_b, bob_a, carol):
        cid = await alice_a.send_dm("bob", "psst")
        ack = await alice_a.expect(type="ack", client_id=cid)
        for session in (alice_a, alice_b, bob_b, bob_a):
            got = await session.expect(type="message", id=ack["id"])
            assert got["to"] == "bob" and got["sender"] == "alice" and got["content"] == "psst"
        await bob_b.send_dm("alice", "hi back")
        await alice_a.expect(type="message", content="hi back", to="alice", sender="bob")
        await alice_b.expect(type="message", content="hi back")
        # Carol is in no thread: a marker in the lobby shows she received nothing else.
        await alice_a.send_room("lobby", "marker")
        await carol.expect(type="message", content="marker")
        assert not carol.messages(content="psst") and not carol.messages(content="hi back")
        for session in (alice_a, bob_b):
            assert len(session.messages(content="psst")) == 1


async def test_a_retried_send_yields_one_message_even_through_another_gateway(
    gateways: list[GatewayProc], nc: NATS
) -> None:
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice"),
        ChatClient.connect(b, "alice"),
        ChatClient.connect(b, "bob"),
    ) as (alice_a, alice_b, bob):
        cid = await alice_a.send_room("lobby", "only once", client_id="retry-1")
        first = await alice_a.expect(type="ack", client_id=cid)
        await alice_a.send_room("lobby", "only once", client_id="retry-1")
        await alice_b.send_room("lobby", "only once", client_id="retry-1")
        acks = await alice_a.expect_count(2, type="ack", client_id=cid)
        again = await alice_b.expect(type="ack", client_id=cid)
        assert "duplicate" not in first
        for ack in [*acks, again]:
            assert (ack["id"], ack["seq"], ack["ts"]) == (first["id"], first["seq"], first["ts"])
        # Only the retries say they are replays.
        assert [ack.get("duplicate") for ack in [*acks, again]] == [None, True, True]
        await bob.send_room("lobby", "marker")
        await alice_a.expect(type="message", content="marker")
        assert len(bob.messages(content="only once")) == 1
        info = await nc.jetstream().stream_info(
            names.STREAM_CHAT, subjects_filter=names.room_subject("lobby")
        )
        assert info.state.subjects == {names.room_subject("lobby"): 2}


async def test_reconnect_to_the_other_gateway_recovers_missed_messages_without_gap_or_dup(
    gateways: list[GatewayProc],
) -> None:
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]),
        ChatClient.connect(b, "bob", rooms=["dev"]),
    ) as (alice, bob):
        await alice.send_room("dev", "before")
        seen = await bob.expect(type="message", content="before")
        await bob.close()
        # While bob is away: room messages, a DM to him, and noise he must not get.
        for text in ("missed 1", "missed 2"):
            await alice.send_room("dev", text)
        await alice.send_dm("bob", "missed dm")
        await alice.send({"type": "join", "room": "secret"})
        await alice.expect(type="joined", room="secret")
        await alice.send_room("secret", "not for bob")
        await alice.expect_count(4, type="ack")

        back = await ChatClient.connect(a, "bob", rooms=["dev"], resume_seq=seen["seq"])
        try:
            resumed = await back.expect(type="resumed")
            assert resumed == {"type": "resumed", "replayed": 3, "complete": True}
            await alice.send_room("dev", "live again")
            await back.expect(type="message", content="live again")
            contents = [m["content"] for m in back.messages()]
            assert contents == ["missed 1", "missed 2", "missed dm", "live again"]
            kinds = [f["type"] for f in back.frames]
            assert kinds.index("welcome") < kinds.index("message") < kinds.index("resumed")
            seqs = [m["seq"] for m in back.messages()]
            assert seqs == sorted(set(seqs))
        finally:
            await back.close()


async def test_recovery_is_bounded_and_says_when_it_is_incomplete(
    nc: NATS, nats_server: Any, logs_dir: Path
) -> None:
    env = {"GATEWAY_RECOVERY_MAX_MESSAGES": "3"}
    with start_gateways(nats_server.url, logs_dir, 1, env) as (gw,):
        async with clients(ChatClient.connect(gw, "alice")) as (alice,):
            start = alice.welcome["seq"]
            for i in range(6):
                await alice.send_room("lobby", f"m{i}")
            await alice.expect_count(6, type="ack")
            back = await ChatClient.connect(gw, "bob", resume_seq=start)
            try:
                resumed = await back.expect(type="resumed")
                assert resumed["replayed"] == 3 and resumed["complete"] is False
                # The newest ones: older ones come from history.
                assert [m["content"] for m in back.messages()] == ["m3", "m4", "m5"]
            finally:
                await back.close()


async def test_typing_indicators_reach_room_members_and_dm_peers(
    gateways: list[GatewayProc],
) -> None:
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]),
        ChatClient.connect(b, "bob", rooms=["dev"]),
    ) as (alice, bob):
        await alice.send({"type": "typing", "room": "dev"})
        assert await bob.expect(type="typing", room="dev") == {
            "type": "typing",
            "room": "dev",
            "user": "alice",
        }
        await bob.send({"type": "typing", "to": "alice"})
        assert await alice.expect(type="typing", **{"from": "bob"}) == {
            "type": "typing",
            "from": "bob",
        }
        assert not alice.matching(type="typing", room="dev")  # not echoed to the typer


async def test_history_and_presence_being_down_are_reported_not_fatal(
    gateways: list[GatewayProc],
) -> None:
    async with clients(ChatClient.connect(gateways[0], "alice")) as (alice,):
        # No presence service runs in this test: the welcome still comes, and says so.
        await alice.expect(type="error", code="presence_unavailable")
        await alice.send({"type": "history", "room": "lobby"})
        err = await alice.expect(type="error", code="history_unavailable")
        assert err["ref"] == "history"
        await alice.send({"type": "ping"})
        await alice.expect(type="pong")


async def test_messages_a_gateway_missed_live_are_refilled_from_the_log_in_order(
    gateways: list[GatewayProc], nc: NATS
) -> None:
    """As after a NATS reconnect: stored messages whose live copy never reached the gateway
    are read from the CHAT stream and delivered before the next live one."""
    a, _ = gateways
    js = nc.jetstream()
    async with clients(ChatClient.connect(a, "alice"), ChatClient.connect(a, "bob")) as (
        alice,
        bob,
    ):
        await alice.send_room("lobby", "first")
        await bob.expect(type="message", content="first")
        # Store two messages without their live copies (republish switched off).
        config = (await js.stream_info(names.STREAM_CHAT)).config
        republish = config.republish
        config.republish = None
        await js.update_stream(config)
        for text in ("missed 1", "missed 2"):
            msg = pb.ChatMessage(
                id=ids.new_id(),
                room="lobby",
                sender="carol",
                content=text,
                ts_ms=int(time.time() * 1000),
            )
            payload, headers = codec.encode(msg)
            await js.publish(names.room_subject("lobby"), payload, headers=headers)
        config.republish = republish
        await js.update_stream(config)
        await alice.send_room("lobby", "next")
        await bob.expect(type="message", content="next")
        assert [m["content"] for m in bob.messages()] == ["first", "missed 1", "missed 2", "next"]
        assert a.metric("gateway_live_gap_refills_total") == 1


async def test_a_socket_in_several_rooms_gets_their_messages_in_stream_order(
    gateways: list[GatewayProc], nc: NATS
) -> None:
    """Clients resume from the highest seq they saw, so across rooms a socket must never
    get a later message before an earlier one. Freezing the gateway while messages for
    three rooms pile up makes each room's subscription hold a backlog at once (the case
    where per-subscription delivery used to hand over one room's whole backlog first)."""
    a, _ = gateways
    rooms = ["order-a", "order-b", "order-c"]
    async with clients(ChatClient.connect(a, "watcher", rooms=rooms)) as (watcher,):
        js = nc.jetstream()
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            for i in range(150):
                room = rooms[i % len(rooms)]
                msg = pb.ChatMessage(id=ids.new_id(), room=room, sender="pumper",
                                     content=f"m{i}", ts_ms=1)  # fmt: skip
                data, headers = codec.encode(msg)
                headers[names.HEADER_MSG_ID] = msg.id
                await js.publish(names.room_subject(room), data, headers=headers)
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        got = await watcher.expect_count(150, timeout=20, type="message", sender="pumper")
        seqs = [m["seq"] for m in got]
        assert seqs == sorted(seqs), "a later message came before an earlier one"
        assert [m["content"] for m in got] == [f"m{i}" for i in range(150)]
