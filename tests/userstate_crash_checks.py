"""User-state steps of the whole-system crash test (tests/test_system_crashes.py), kept
apart so the crash scenario stays readable: every client marks its threads read, then,
after an archive and a gateway were SIGKILLed (and again at the end), a fresh session of
each user must get unread counts in its welcome that equal what the CHAT log says."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect

from tests.system_fixtures import ScoringClient, chat_log, mint_token, thread_key_of_subject
from tests.waiting import wait_until

CAP = 100  # gateway.userstate.UNREAD_CAP
Markers = dict[str, dict[str, int]]  # user -> thread key ("room:dev", "dm:u1") -> seq


async def mark_threads_read(clients: list[ScoringClient], database_url: str) -> Markers:
    """Each client reads each of its threads up to the newest message it saw; returns
    the markers once the archive stored them all."""
    markers: Markers = {}
    for client in clients:
        mine = markers.setdefault(client.user, {})
        for key, seen in list(client.seen.items()):
            if not seen:
                continue
            seq = max(s for s, _ in seen)
            kind, name = key.split(":", 1)
            target = {"room": name} if kind == "room" else {"with": name}
            await client.send_json({"type": "read", **target, "seq": seq})
            mine[key] = seq

    expected = {
        (user, ("r:" if key.startswith("room:") else "d:") + key.split(":", 1)[1], seq)
        for user, threads in markers.items()
        for key, seq in threads.items()
    }

    async def stored() -> bool:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch('SELECT "user", thread, seq FROM read_markers')
        finally:
            await conn.close()
        return expected <= {(r["user"], r["thread"], r["seq"]) for r in rows}

    await wait_until(stored, "every read marker stored", timeout=30, interval=0.2)
    return markers


async def probe_welcome(url: str, user: str) -> dict[str, Any]:
    """A fresh session of `user` (no hello.rooms: the server's state only)."""
    async with connect(url, open_timeout=5, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "hello", "v": 1, "token": mint_token(user)}))
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert welcome.get("type") == "welcome", welcome
    return dict(welcome)


async def check_unread_exact(
    nc: NATS, urls: list[str], clients: list[ScoringClient], markers: Markers, label: str
) -> None:
    """Each user's welcome lists their rooms (from the server: the hello names none) and
    counts equal the CHAT log's messages from others after the marker, up to welcome.seq
    (capped), for every thread of theirs."""
    problems: list[str] = []
    welcomes = [await probe_welcome(urls[n % len(urls)], c.user) for n, c in enumerate(clients)]
    log = await chat_log(nc)
    for client, welcome in zip(clients, welcomes, strict=True):
        user = client.user
        assert "unread" in welcome, f"{label}: {user}'s welcome has no unread counts"
        # The rooms come from the server alone (this hello named none): memberships
        # survived every crash so far.
        assert welcome["rooms"] == sorted(client.rooms), (label, user, welcome["rooms"])
        got = {
            ("room:" + e["room"]) if "room" in e else ("dm:" + e["with"]): e["unread"]
            for e in welcome["unread"]
        }
        upto = int(welcome["seq"])
        wanted: dict[str, int] = {}
        for m in log:
            key = thread_key_of_subject(m.subject, user)
            if key is None or m.seq > upto or m.sender == user:
                continue
            if key.startswith("room:") and key[5:] not in welcome["rooms"]:
                continue
            if m.seq > markers.get(user, {}).get(key, 0):
                wanted[key] = min(CAP, wanted.get(key, 0) + 1)
        for key in set(wanted) | set(got):
            if got.get(key, 0) != wanted.get(key, 0):
                problems.append(f"{user} {key}: welcome says {got.get(key, 0)}, log says "
                                f"{wanted.get(key, 0)} (upto {upto})")  # fmt: skip
    assert not problems, f"{label}: unread counts are not exact:\n" + "\n".join(problems)
