"""The message lifecycle's part of the whole-system crash test (issue 14).

Lifecycle users post in their own room, then edit, delete and react to those messages all
through the crash run (the same kills as everyone else). Afterwards:

- the archive's state (content, tombstones, reactions) equals the state rebuilt by
  replaying the CHAT stream (`rebuild`), and each event is recorded once, none refused;
- every lifecycle client, connected or resumed through the kills, converged to it;
- no deleted content is left in the CHAT stream.

Kept apart from test_system_crashes.py so the scored load's checks stay as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats.js.errors
from chatlib import message_events, names
from chatlib.message_events import ChatEvent
from chatlib.proto.chat import v1 as pb
from nats.aio.client import Client as NATS

from tests.system_fixtures import ScoringClient
from tests.waiting import wait_until

ROOM = "life"
USERS = ["life0", "life1", "life2", "life3"]
EMOJI = ["\U0001f44d", "\u2764\ufe0f", "\U0001f389"]
# Answers after which a lifecycle frame is sent again with the same client_id.
RETRYABLE = {"send_failed", "rate_limited", "lookup_unavailable"}
RESEND_AFTER = 3.0


@dataclass
class Shown:
    """One message as a client (or the log, or the archive) shows it."""

    content: str = ""
    deleted: bool = False
    version: int = 0
    reactions: dict[tuple[str, str], tuple[int, bool]] = field(default_factory=dict)

    def final(self) -> tuple[Any, ...]:
        if self.deleted:
            return ("deleted",)
        present = sorted(k for k, (_, on) in self.reactions.items() if on)
        return (self.content, tuple(present))


def fold(view: dict[str, Shown], seq: int, kind: str, frame: dict[str, Any]) -> None:
    """Apply one message/edit/delete/reaction, by sequence, to a view: what a client
    does with the frames it gets (any order, duplicates harmless)."""
    shown = view.setdefault(frame["id"], Shown())
    if kind == "message":
        if not shown.deleted and shown.version == 0:
            shown.content = frame["content"]
    elif kind == "edit":
        if not shown.deleted and seq > shown.version:
            shown.content, shown.version = frame["content"], seq
    elif kind == "delete":
        shown.deleted, shown.content = True, ""
    elif kind == "reaction":
        key = (frame["user"], frame["emoji"])
        if seq > shown.reactions.get(key, (0, False))[0]:
            shown.reactions[key] = (seq, bool(frame["added"]))


class LifecycleClient(ScoringClient):
    """A ScoringClient that also folds edits, deletes and reactions into `view`."""

    view: dict[str, Shown]
    mine: list[str]
    answers: dict[str, dict[str, Any]]

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind in ("message", "edit", "delete", "reaction") and frame.get("room") == ROOM:
            seq = int(frame["seq"])
            fold(self.view, seq, str(kind), frame)
            self.max_seq = max(self.max_seq, seq)
        if kind in ("ack", "error") and (frame.get("client_id") or frame.get("ref")):
            self.answers[frame.get("client_id") or frame["ref"]] = frame
        if kind == "ack" and frame["client_id"] in self.unacked:
            if self.unacked[frame["client_id"]].get("type") == "send":
                self.mine.append(frame["id"])
        super()._on_frame(frame)


def lifecycle_client(user: str, gateway_urls: Any, index: int) -> LifecycleClient:
    client = LifecycleClient(user, ["lobby", ROOM], gateway_urls)
    client.view, client.mine, client.answers = {}, [], {}
    client.keep_frames = False
    client._url_index = index
    return client


async def _request(client: LifecycleClient, frame: dict[str, Any], deadline: float) -> bool:
    """Send a frame until acked (resending the same client_id after a retryable error or
    silence); False when refused for good (e.g. a reaction to a message just deleted)."""
    cid = frame["client_id"]
    client.unacked[cid] = frame
    sent_at = 0.0
    while time.monotonic() < deadline:
        answer = client.answers.get(cid)
        if answer is not None and answer["type"] == "ack":
            return True
        if answer is not None and answer.get("code") not in RETRYABLE:
            client.unacked.pop(cid, None)
            return False
        if (answer is not None or time.monotonic() - sent_at > RESEND_AFTER) and client.connected:
            client.answers.pop(cid, None)
            sent_at = time.monotonic()
            with contextlib.suppress(Exception):
                await client.send_json(frame)
        await asyncio.sleep(0.05)
    client.unacked.pop(cid, None)
    return False


async def run_lifecycle(clients: list[LifecycleClient], done: asyncio.Event) -> dict[str, int]:
    """Each client sends, edits, reacts and deletes until `done` (and at least 12 steps)."""
    counts = {"send": 0, "edit": 0, "delete": 0, "react": 0}

    async def one(client: LifecycleClient) -> None:
        rng = random.Random(client.user)
        others = [c for c in clients if c is not client]
        step = 0
        while step < 12 or not done.is_set():
            step += 1
            cid = f"{client.user}-l{step}"
            deadline = time.monotonic() + 90
            roll = rng.random()
            live_mine = [m for m in client.mine if not client.view.get(m, Shown()).deleted]
            if roll < 0.35 or not live_mine:
                frame = {"type": "send", "room": ROOM, "content": f"{client.user} says {step}",
                         "client_id": cid}  # fmt: skip
                kind = "send"
            elif roll < 0.65:
                frame = {"type": "edit", "id": rng.choice(live_mine),
                         "content": f"{client.user} edit {step}", "client_id": cid}  # fmt: skip
                kind = "edit"
            elif roll < 0.9:
                theirs = [m for o in others for m in o.mine] or live_mine
                frame = {"type": "react", "id": rng.choice(theirs), "emoji": rng.choice(EMOJI),
                         "remove": rng.random() < 0.3, "client_id": cid}  # fmt: skip
                kind = "react"
            else:
                frame = {"type": "delete", "id": rng.choice(live_mine), "client_id": cid}
                kind = "delete"
            if await _request(client, frame, deadline):
                counts[kind] += 1
            await asyncio.sleep(0.2)

    await asyncio.gather(*(one(c) for c in clients))
    return counts


async def chat_events(nc: NATS) -> list[tuple[int, str, ChatEvent]]:
    """Every message and event in the CHAT stream, in stream order (direct gets)."""
    js = nc.jetstream()
    info = await js.stream_info(names.STREAM_CHAT)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            raw = await js.get_msg(names.STREAM_CHAT, seq)
        except nats.js.errors.NotFoundError:
            continue  # deleted (by the archive, after a delete) or expired
        event = message_events.decode_chat(raw.data or b"", dict(raw.headers or {}))
        out.append((seq, raw.subject or "", event))
    return out


def rebuild(log: list[tuple[int, str, ChatEvent]], room: str = ROOM) -> dict[str, Shown]:
    """The state of a room's messages as replaying the CHAT stream gives it."""
    view: dict[str, Shown] = {}
    for seq, subject, event in log:
        if subject != names.room_subject(room):
            continue
        if isinstance(event, pb.ChatMessage):
            fold(view, seq, "message", {"id": event.id, "content": event.content})
        elif isinstance(event, pb.MessageEdit):
            fold(view, seq, "edit", {"id": event.message_id, "content": event.content})
        elif isinstance(event, pb.MessageDelete):
            fold(view, seq, "delete", {"id": event.message_id})
        else:
            frame = {"id": event.message_id, "user": event.sender, "emoji": event.emoji,
                     "added": not event.removed}  # fmt: skip
            fold(view, seq, "reaction", frame)
    return view


def deleted_ids(log: list[tuple[int, str, ChatEvent]]) -> set[str]:
    return {e.message_id for _, _, e in log if isinstance(e, pb.MessageDelete)}


async def archive_state(database_url: str, room: str = ROOM) -> dict[str, tuple[Any, ...]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, content, deleted FROM messages WHERE room = $1", room)
        reactions = await conn.fetch(
            "SELECT message_id, user_name, emoji FROM reactions WHERE present"
            " ORDER BY user_name, emoji"
        )
    finally:
        await conn.close()
    by_message: dict[str, list[tuple[str, str]]] = {}
    for r in reactions:
        by_message.setdefault(r["message_id"], []).append((r["user_name"], r["emoji"]))
    return {
        r["id"]: ("deleted",)
        if r["deleted"]
        else (r["content"], tuple(by_message.get(r["id"], [])))
        for r in rows
    }


async def event_rows(database_url: str) -> list[asyncpg.Record]:
    """Every lifecycle event the archive recorded: id, message, kind, refused, applied."""
    conn = await asyncpg.connect(database_url)
    try:
        return list(
            await conn.fetch("SELECT id, message_id, kind, refused, applied FROM message_events")
        )
    finally:
        await conn.close()


async def check_lifecycle(
    nc: NATS, clients: list[LifecycleClient], database_url: str, counts: dict[str, int]
) -> None:
    assert min(counts.values()) > 0, f"every kind of change ran through the kills: {counts}"
    log = await chat_events(nc)
    expected = {mid: shown.final() for mid, shown in rebuild(log).items()}
    logged_events = {e.id for _, s, e in log if not isinstance(e, pb.ChatMessage)}

    async def archive_matches() -> bool:
        return await archive_state(database_url) == expected

    try:
        await wait_until(archive_matches, "archive state == CHAT replay", timeout=60, interval=0.5)
    except AssertionError as exc:
        got = await archive_state(database_url)
        diff = {k: (got.get(k), expected.get(k)) for k in {*got, *expected}
                if got.get(k) != expected.get(k)}  # fmt: skip
        problem = f"archive differs from the log replay: {list(diff.items())[:5]}"
        raise AssertionError(problem) from exc
    # Each event recorded once (the id is the key), applied, none refused; the only ones
    # the log no longer has are edits of deleted messages (removed from CHAT with them).
    recorded = await event_rows(database_url)
    assert all(r["applied"] and r["refused"] is None for r in recorded), recorded[:3]
    recorded_ids = {r["id"] for r in recorded}
    assert logged_events <= recorded_ids, logged_events - recorded_ids
    gone = deleted_ids(log)
    extra = [r for r in recorded if r["id"] not in logged_events]
    assert all(r["kind"] == "edit" and r["message_id"] in gone for r in extra), extra[:3]

    for client in clients:

        def converged(client: LifecycleClient = client) -> bool:
            return {m: s.final() for m, s in client.view.items()} == expected

        await wait_until(converged, f"{client.user} converged to the log", timeout=20)

    for _, _, event in log:  # nothing deleted is left in the log to replay
        if isinstance(event, pb.ChatMessage):
            assert event.id not in gone, f"deleted message still in CHAT: {event}"
        elif isinstance(event, pb.MessageEdit):
            assert event.message_id not in gone, f"deleted message's edit in CHAT: {event}"
