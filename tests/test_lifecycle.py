"""Message lifecycle end to end (issue 14): edits, deletes, reactions and replies through
real gateways, NATS, the archive and Postgres."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import asyncpg
import jwt
from chatlib import codec, ids, names
from chatlib.proto.chat import v1 as pb
from nats.aio.client import Client as NATS

from tests.archive_fixtures import ArchiveProc, archive_db, archive_procs, start_archive
from tests.gateway_fixtures import ChatClient, GatewayProc, clients, gateways, start_gateways
from tests.lifecycle_fixtures import (
    answer,
    archived,
    chat_log,
    delete,
    edit,
    react,
    request,
)
from tests.waiting import wait_until

__all__ = ["archive_db", "archive_procs", "gateways"]

THUMBS, HEART = "\U0001f44d", "\u2764\ufe0f"


async def answer_again(client: ChatClient, cid: str) -> dict[str, Any]:
    """The second answer to a client_id (the first was to the first attempt)."""

    def second() -> list[dict[str, Any]]:
        got = [f for f in client.frames if cid in (f.get("client_id"), f.get("ref"))]
        return [f for f in got if f["type"] in ("ack", "error")][1:]

    found = await wait_until(second, f"second answer to {cid}", timeout=10)
    assert isinstance(found, list)
    return found[0]


def thread_page(frame: dict[str, Any]) -> list[dict[str, Any]]:
    return list(frame["messages"])


async def _sent(client: ChatClient, room: str, content: str, **extra: Any) -> dict[str, Any]:
    cid = f"c-{ids.new_id()[-12:]}"
    await client.send({"type": "send", "room": room, "content": content, "client_id": cid, **extra})
    return await answer(client, cid)


async def test_an_author_edits_then_deletes_and_every_member_sees_it_live_and_in_history(
    gateways: list[GatewayProc],
    nats_server: Any,
    database_url: str,
    archive_db: asyncpg.Pool,
    archive_procs: list[ArchiveProc],
    logs_dir: Path,
) -> None:
    start_archive(archive_procs, nats_server.url, database_url, logs_dir)
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]), ChatClient.connect(b, "bob", rooms=["dev"])
    ) as (alice, bob):
        ack = await _sent(alice, "dev", "teh first draft")
        assert ack["type"] == "ack"
        mid = ack["id"]
        edited = await answer(alice, await edit(alice, mid, "the final text"))
        assert edited["type"] == "ack" and edited["seq"] > ack["seq"]
        live = await bob.expect(type="edit", id=mid)
        assert live["content"] == "the final text" and live["sender"] == "alice"
        assert live["room"] == "dev" and live["seq"] == edited["seq"] and "client_id" not in live
        own = await alice.expect(type="edit", id=mid)
        assert own["client_id"] == edited["client_id"]

        async def shows_edit() -> dict[str, Any] | None:
            page = await request(alice, "history", room="dev")
            found = [m for m in page["messages"] if m["id"] == mid]
            return found[0] if found and found[0].get("edited_at") else None

        message = await wait_until(shows_edit, "edit archived", timeout=15, interval=0.2)
        assert isinstance(message, dict)
        assert message["content"] == "the final text"
        assert message["edited_at"] == live["edited_at"]

        deleted = await answer(alice, await delete(alice, mid))
        assert deleted["type"] == "ack"
        gone = await bob.expect(type="delete", id=mid)
        assert gone["by"] == "alice" and gone["seq"] == deleted["seq"]

        async def shows_tombstone() -> dict[str, Any] | None:
            page = await request(bob, "history", room="dev")
            found = [m for m in page["messages"] if m["id"] == mid]
            return found[0] if found and found[0].get("deleted") else None

        tomb = await wait_until(shows_tombstone, "delete archived", timeout=15, interval=0.2)
        assert isinstance(tomb, dict)
        # The tombstone keeps its place (id, sender, time) and nothing that was said.
        assert tomb["content"] == "" and tomb["sender"] == "alice" and tomb["ts"] == ack["ts"]
        assert "edited_at" not in tomb or tomb["content"] == ""
        # A retried delete (same client_id, the first one's ack lost) is acked as the same.
        retried = await answer_again(alice, await delete(alice, mid, deleted["client_id"]))
        assert retried["duplicate"] is True and retried["seq"] == deleted["seq"]
        # An edit after the delete is refused: the message is gone.
        late = await answer(alice, await edit(alice, mid, "resurrected"))
        assert late == {**late, "type": "error", "code": "not_found"}


async def test_only_the_author_edits_or_deletes_and_a_refusal_publishes_nothing(
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
        ChatClient.connect(b, "bob", rooms=["dev"]),
        ChatClient.connect(b, "carol"),
    ) as (alice, bob, carol):
        room_msg = (await _sent(alice, "dev", "mine"))["id"]
        dm_cid = await alice.send_dm("bob", "just us")
        dm_msg = (await answer(alice, dm_cid))["id"]
        # Wait until the archive knows both, so every refusal below is about authority.
        await wait_until(lambda: archived(archive_db, dm_msg), "archived", 15, 0.1)
        await wait_until(lambda: archived(archive_db, room_msg), "archived", 15, 0.1)
        js = nc.jetstream()
        before = (await js.stream_info(names.STREAM_CHAT)).state.last_seq

        refusals = [
            (bob, await edit(bob, room_msg, "bob was here")),  # someone else's message
            (bob, await delete(bob, room_msg)),
            (bob, await edit(bob, dm_msg, "bob was here")),  # a DM he takes part in
            (carol, await edit(carol, dm_msg, "carol was here")),  # someone else's DM
            (carol, await delete(carol, dm_msg)),
            (carol, await react(carol, dm_msg, THUMBS)),
            (carol, await react(carol, room_msg, THUMBS)),  # a room she has not joined
        ]
        for client, cid in refusals:
            got = await answer(client, cid)
            assert (got["type"], got["code"]) == ("error", "forbidden"), got
        unknown = await answer(bob, await edit(bob, ids.new_id(), "x"))
        assert unknown["code"] == "not_found"
        bad = await answer(bob, await react(bob, room_msg, "\U0001f4a9"))
        assert bad["code"] == "bad_emoji"
        await bob.send({"type": "edit", "id": "not-an-id", "content": "x", "client_id": "k1"})
        assert (await bob.expect(type="error", ref="k1"))["code"] == "bad_frame"

        assert (await js.stream_info(names.STREAM_CHAT)).state.last_seq == before
        row = await archived(archive_db, room_msg)
        assert row is not None and row["content"] == "mine" and not row["deleted"]
        assert not bob.matching(type="edit") and not bob.matching(type="delete")


async def test_a_forged_event_published_straight_onto_nats_changes_nothing(
    gateways: list[GatewayProc],
    nats_server: Any,
    database_url: str,
    archive_db: asyncpg.Pool,
    archive_procs: list[ArchiveProc],
    logs_dir: Path,
    nc: NATS,
) -> None:
    """The archive checks authority again: a misbehaving publisher (here the admin user)
    that names mallory as the editor of alice's message changes no row."""
    start_archive(archive_procs, nats_server.url, database_url, logs_dir)
    async with clients(ChatClient.connect(gateways[0], "alice", rooms=["dev"])) as (alice,):
        mid = (await _sent(alice, "dev", "original"))["id"]
        js = nc.jetstream()
        forged = [
            pb.MessageEdit(id=ids.new_id(), message_id=mid, room="dev", sender="mallory",
                           content="forged", ts_ms=1),
            pb.MessageDelete(id=ids.new_id(), message_id=mid, room="dev", sender="mallory"),
            # The author's name, but another conversation than the message's.
            pb.MessageEdit(id=ids.new_id(), message_id=mid, room="other", sender="alice",
                           content="moved", ts_ms=1),
        ]  # fmt: skip
        for event in forged:
            data, headers = codec.encode(event)
            subject = names.room_subject(event.room)
            await js.publish(subject, data, headers=headers, stream=names.STREAM_CHAT)

        async def all_refused() -> bool:
            rows = await archive_db.fetch(
                "SELECT refused FROM message_events WHERE message_id = $1", mid
            )
            return len(rows) == 3 and all(r["refused"] for r in rows)

        await wait_until(all_refused, "forged events refused", timeout=15, interval=0.2)
        row = await archived(archive_db, mid)
        assert row is not None
        assert (row["content"], row["deleted"], row["edited_at_ms"]) == ("original", False, None)


async def test_deleted_content_is_served_by_neither_history_search_nor_reconnect_replay(
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
        ChatClient.connect(a, "alice", rooms=["dev"]), ChatClient.connect(b, "bob", rooms=["dev"])
    ) as (alice, bob):
        keep = (await _sent(alice, "dev", "harmless zebra"))["id"]
        secret = await _sent(alice, "dev", "password zebra hunter2")
        await answer(alice, await edit(alice, secret["id"], "password zebra hunter3"))
        await bob.expect(type="edit", id=secret["id"])
        resume_from = secret["seq"] - 1  # bob will ask for everything from before it
        await bob.close()

        found = await request(alice, "search", query="zebra")
        assert found["type"] == "search"
        await wait_until(lambda: archived(archive_db, secret["id"]), "archived", 15, 0.1)
        await answer(alice, await delete(alice, secret["id"]))

        async def applied() -> bool:
            row = await archived(archive_db, secret["id"])
            return bool(row and row["deleted"])

        await wait_until(applied, "delete applied", timeout=15, interval=0.2)

        # Search: the other zebra only.
        async def searched() -> list[dict[str, Any]]:
            page = await request(alice, "search", query="zebra")
            return page["results"]

        results = await wait_until(searched, "search answers", 10, 0.2)
        assert isinstance(results, list)
        assert [r["id"] for r in results] == [keep]
        assert "\ue000zebra\ue001" in results[0]["snippet"]
        assert (await request(alice, "search", query="hunter2"))["results"] == []
        assert (await request(alice, "search", query="hunter3"))["results"] == []

        # History: a tombstone.
        page = await request(alice, "history", room="dev")
        tomb = next(m for m in page["messages"] if m["id"] == secret["id"])
        assert tomb["deleted"] is True and tomb["content"] == ""

        # The log itself no longer holds the content (the archive removed it), so no
        # replay (on any door) can serve it.
        async def purged() -> bool:
            log = await chat_log(nc)
            return not any("hunter" in getattr(e, "content", "") for e in log.values())

        await wait_until(purged, "deleted content removed from CHAT", timeout=15, interval=0.2)

        # Reconnect replay: bob resumes from before the message.
        bob = await ChatClient.connect(b, "bob", rooms=["dev"], resume_seq=resume_from)
        try:
            await bob.expect(type="resumed")
            replayed = [f for f in bob.frames if f.get("type") in ("message", "edit")]
            assert all("hunter" not in f.get("content", "") for f in replayed), replayed
            assert bob.matching(type="delete", id=secret["id"])
        finally:
            await bob.close()

        # Archive state stays right however often the delete is applied again.
        row = await archived(archive_db, secret["id"])
        assert row is not None and row["content"] == ""
        edits = await archive_db.fetch(
            "SELECT content FROM message_events WHERE message_id = $1 AND kind = 'edit'",
            secret["id"],
        )
        assert [r["content"] for r in edits] == [None]


async def test_replay_honours_a_delete_the_archive_has_not_applied_yet(
    gateways: list[GatewayProc], nc: NATS
) -> None:
    """No archive runs here: the original is still in the log, and replay still leaves
    its content (and its edits) out, sending the delete instead."""
    js = nc.jetstream()
    message = pb.ChatMessage(id=ids.new_id(), room="dev", sender="alice", content="oops", ts_ms=1)
    later = [
        pb.MessageEdit(id=ids.new_id(), message_id=message.id, room="dev", sender="alice",
                       content="oops again", ts_ms=2),
        pb.MessageDelete(id=ids.new_id(), message_id=message.id, room="dev", sender="alice",
                         ts_ms=3),
    ]  # fmt: skip
    first = 0
    for event in [message, *later]:
        data, headers = codec.encode(event)
        ack = await js.publish("chat.room.dev", data, headers=headers, stream=names.STREAM_CHAT)
        first = first or ack.seq
    bob = await ChatClient.connect(gateways[0], "bob", rooms=["dev"], resume_seq=first - 1)
    try:
        resumed = await bob.expect(type="resumed")
        assert resumed["replayed"] == 1
        assert not bob.messages() and not bob.matching(type="edit")
        assert bob.matching(type="delete", id=message.id)
    finally:
        await bob.close()


async def test_reactions_are_idempotent_per_user_and_emoji_and_shown_live_and_in_history(
    gateways: list[GatewayProc],
    nats_server: Any,
    database_url: str,
    archive_db: asyncpg.Pool,
    archive_procs: list[ArchiveProc],
    logs_dir: Path,
) -> None:
    start_archive(archive_procs, nats_server.url, database_url, logs_dir)
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]), ChatClient.connect(b, "bob", rooms=["dev"])
    ) as (alice, bob):
        mid = (await _sent(alice, "dev", "lunch?"))["id"]
        for _ in range(2):  # the same reaction twice counts once
            assert (await answer(bob, await react(bob, mid, THUMBS)))["type"] == "ack"
        assert (await answer(alice, await react(alice, mid, THUMBS)))["type"] == "ack"
        assert (await answer(bob, await react(bob, mid, HEART)))["type"] == "ack"
        assert (await answer(bob, await react(bob, mid, HEART, remove=True)))["type"] == "ack"
        live = await alice.expect_count(5, type="reaction", id=mid)
        assert [(f["user"], f["emoji"], f["added"]) for f in live][-1] == ("bob", HEART, False)

        async def counted() -> list[dict[str, Any]] | None:
            page = await request(alice, "history", room="dev")
            message = next(m for m in page["messages"] if m["id"] == mid)
            reactions = message.get("reactions")
            return reactions if reactions and len(reactions[0]["users"]) == 2 else None

        reactions = await wait_until(counted, "reactions archived", timeout=15, interval=0.2)
        assert reactions == [{"emoji": THUMBS, "count": 2, "users": ["alice", "bob"]}]


async def test_a_reply_names_its_parent_live_and_in_history(
    gateways: list[GatewayProc],
    nats_server: Any,
    database_url: str,
    archive_db: asyncpg.Pool,
    archive_procs: list[ArchiveProc],
    logs_dir: Path,
) -> None:
    start_archive(archive_procs, nats_server.url, database_url, logs_dir)
    a, b = gateways
    async with clients(
        ChatClient.connect(a, "alice", rooms=["dev"]), ChatClient.connect(b, "bob", rooms=["dev"])
    ) as (alice, bob):
        parent = (await _sent(alice, "dev", "who's in?"))["id"]
        reply = await _sent(bob, "dev", "me", reply_to=parent)
        assert reply["type"] == "ack"
        live = await alice.expect(type="message", id=reply["id"])
        assert live["reply_to"] == parent
        bad = await _sent(bob, "dev", "me", reply_to="nope")
        assert bad["code"] == "bad_frame"

        async def archived_reply() -> dict[str, Any] | None:
            page = await request(alice, "history", room="dev")
            found = [m for m in page["messages"] if m["id"] == reply["id"]]
            return found[0] if found else None

        message = await wait_until(archived_reply, "reply archived", timeout=15, interval=0.2)
        assert isinstance(message, dict) and message["reply_to"] == parent

        # A reply thread: the parent and its replies, nothing else of the room.
        await _sent(alice, "dev", "unrelated")
        second = await _sent(alice, "dev", "count me in", reply_to=parent)
        await wait_until(lambda: archived(archive_db, second["id"]), "archived", 15, 0.1)
        thread = await request(bob, "history", room="dev", thread=parent)
        assert thread["thread"] == parent
        assert [m["id"] for m in thread["messages"]] == [parent, reply["id"], second["id"]]
        # Around a message: it and older ones (half the page), and newer ones.
        unrelated = next(m for m in thread_page(await request(bob, "history", room="dev"))
                         if m["content"] == "unrelated")  # fmt: skip
        around = await request(bob, "history", room="dev", around=reply["id"], limit=2)
        assert [m["id"] for m in around["messages"]] == [reply["id"], unrelated["id"]]
        assert around["has_more"] is True  # the parent is older
        refused = await request(bob, "history", room="dev", around=parent, before=parent)
        assert refused["code"] == "bad_frame"


async def test_an_operator_role_in_the_jwt_deletes_anyones_message_and_nothing_else_does(
    nc: NATS,
    nats_server: Any,
    database_url: str,
    archive_db: asyncpg.Pool,
    archive_procs: list[ArchiveProc],
    logs_dir: Path,
) -> None:
    secret = "an-identity-providers-secret-of-32-bytes+"
    env = {"GATEWAY_AUTH_MODE": "jwt", "GATEWAY_JWT_SECRET": secret}

    def token(user: str, roles: list[str] | None = None) -> str:
        claims: dict[str, Any] = {"sub": user, "exp": int(time.time()) + 300}
        if roles is not None:
            claims["roles"] = roles
        return jwt.encode(claims, secret, "HS256")

    start_archive(archive_procs, nats_server.url, database_url, logs_dir)
    with start_gateways(nats_server.url, logs_dir, 1, env) as (gw,):
        async with clients(
            ChatClient.connect(gw, "alice", rooms=["dev"], token=token("alice")),
            ChatClient.connect(gw, "mallory", rooms=["dev"], token=token("mallory", ["admin"])),
            ChatClient.connect(gw, "oscar", rooms=["dev"], token=token("oscar", ["chat-operator"])),
        ) as (alice, mallory, oscar):
            mid = (await _sent(alice, "dev", "spam spam spam"))["id"]
            refused = await answer(mallory, await delete(mallory, mid))
            assert refused["code"] == "forbidden"  # a role, but not the operator's
            editing = await answer(oscar, await edit(oscar, mid, "moderated"))
            assert editing["code"] == "forbidden"  # operators delete, they do not edit
            assert (await answer(oscar, await delete(oscar, mid)))["type"] == "ack"
            gone = await alice.expect(type="delete", id=mid)
            assert gone["by"] == "oscar"

            async def tombstone() -> bool:
                row = await archived(archive_db, mid)
                return bool(row and row["deleted"] and row["content"] == "")

            await wait_until(tombstone, "operator delete applied", timeout=15, interval=0.2)

            # The role goes with the token: a fresh token in an `auth` frame grants it
            # (mallory) or takes it away (oscar) from then on.
            second = (await _sent(alice, "dev", "more spam"))["id"]
            await mallory.send({"type": "auth", "token": token("mallory", ["chat-operator"])})
            await mallory.expect(type="auth")
            await oscar.send({"type": "auth", "token": token("oscar")})
            await oscar.expect(type="auth")
            assert (await answer(oscar, await delete(oscar, second)))["code"] == "forbidden"
            assert (await answer(mallory, await delete(mallory, second)))["type"] == "ack"
            assert (await alice.expect(type="delete", id=second))["by"] == "mallory"
