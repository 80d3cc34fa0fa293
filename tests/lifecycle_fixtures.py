"""Helpers for the message lifecycle tests (issue 14): frames a ChatClient sends, and
reading the CHAT stream and the archive's rows back.

    from tests.lifecycle_fixtures import edit, delete, react, search, history
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
from chatlib import message_events, names
from chatlib.message_events import ChatEvent
from nats.aio.client import Client as NATS
from nats.js import api

from tests.gateway_fixtures import ChatClient


def _cid() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


async def edit(client: ChatClient, message_id: str, content: str, cid: str = "") -> str:
    cid = cid or _cid()
    await client.send({"type": "edit", "id": message_id, "content": content, "client_id": cid})
    return cid


async def delete(client: ChatClient, message_id: str, cid: str = "") -> str:
    cid = cid or _cid()
    await client.send({"type": "delete", "id": message_id, "client_id": cid})
    return cid


async def react(client: ChatClient, message_id: str, emoji: str, remove: bool = False) -> str:
    cid = _cid()
    frame = {"type": "react", "id": message_id, "emoji": emoji, "client_id": cid}
    if remove:
        frame["remove"] = True
    await client.send(frame)
    return cid


async def answer(client: ChatClient, cid: str, timeout: float = 10.0) -> dict[str, Any]:
    """The ack or the error a lifecycle frame got."""
    from tests.waiting import wait_until

    def found() -> list[dict[str, Any]]:
        return [
            f
            for f in client.frames
            if (f.get("type") == "ack" and f.get("client_id") == cid)
            or (f.get("type") == "error" and f.get("ref") == cid)
        ]

    frames = await wait_until(found, f"{client.user}: answer to {cid}", timeout)
    assert isinstance(frames, list)
    return frames[0]


async def request(client: ChatClient, kind: str, **fields: Any) -> dict[str, Any]:
    """Send a history or search frame and return the answer (or the error frame)."""
    before = len(client.matching(type=kind)) + len(client.matching(type="error", ref=kind))
    await client.send({"type": kind, **fields})
    from tests.waiting import wait_until

    def arrived() -> list[dict[str, Any]]:
        got = [f for f in client.frames if f.get("type") == kind or f.get("ref") == kind]
        return got[before:]

    frames = await wait_until(arrived, f"{client.user}: {kind} answer", 10)
    assert isinstance(frames, list)
    return frames[0]


async def chat_log(nc: NATS) -> dict[int, ChatEvent]:
    """Everything the CHAT stream holds now, by sequence, decoded."""
    js = nc.jetstream()
    info = await js.stream_info(names.STREAM_CHAT)
    out: dict[int, ChatEvent] = {}
    if info.state.messages == 0:
        return out
    sub = await js.subscribe(
        names.CHAT_ALL,
        stream=names.STREAM_CHAT,
        ordered_consumer=True,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
    )
    try:
        while len(out) < info.state.messages:
            msg = await sub.next_msg(timeout=5)
            out[msg.metadata.sequence.stream] = message_events.decode_chat(msg.data, msg.headers)
    finally:
        await sub.unsubscribe()
    return out


async def archived(db: asyncpg.Pool, message_id: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM messages WHERE id = $1", message_id)
