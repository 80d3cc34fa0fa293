"""User state (issue #13): the hello of a user in 200 rooms with unread counts, next to
the hello of a user with nothing stored (lobby only) on the same system in the same run.

The heavy user's rooms, markers and the messages their counts are made of are real:
stored through the gateway (join/read events) and the archive (messages from the CHAT
stream), so each hello does what a returning user's does: one request to the archive,
200 room subscriptions, the unread/mention counts, the welcome.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import nats
import orjson
from chatlib import codec, ids, names
from chatlib.proto.chat import v1 as pb

from devtools.bench import wsclient
from devtools.bench.cluster import Cluster
from devtools.bench.report import Figure, Run, percentile
from devtools.bench.ws_scenarios import Ctx

ROOMS = 200
PER_ROOM = 20  # messages per room, one in four naming the user


async def _hello(port: int, token: str, rooms: list[str]) -> tuple[float, dict[str, Any]]:
    """Milliseconds from hello to welcome, and the welcome."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_text(data: bytes) -> None:
        if not got.done() and b'"welcome"' in data:
            got.set_result(data)

    conn = await wsclient.connect("127.0.0.1", port, "/ws", on_text)
    try:
        started = time.perf_counter()
        conn.send_text(orjson.dumps({"type": "hello", "v": 1, "token": token, "rooms": rooms}))
        data = await asyncio.wait_for(got, 20)
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        conn.close()
    return elapsed, orjson.loads(data)


async def _wait(db_url: str, query: str, target: int, timeout: float = 120) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        deadline = time.monotonic() + timeout
        while int(await conn.fetchval(query)) < target:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {query} >= {target}")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def _prepare(port: int, nats_url: str, db_url: str, token_fn: Any) -> None:
    rooms = [f"room{i:03d}" for i in range(ROOMS)]
    # First hello: hello.rooms are stored as the user's memberships.
    await _hello(port, token_fn("heavy"), rooms)
    await _wait(db_url, "SELECT count(*) FROM memberships WHERE member", ROOMS + 1)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        now = int(time.time() * 1000)
        pending = []
        for n in range(PER_ROOM):
            for room in rooms:
                content = f"news {n} for @heavy" if n % 4 == 0 else f"news {n}"
                msg = pb.ChatMessage(
                    id=ids.new_id(), room=room, sender="poster", content=content, ts_ms=now
                )
                payload, headers = codec.encode(msg)
                headers[names.HEADER_MSG_ID] = msg.id
                pending.append(
                    js.publish(names.room_subject(room), payload, headers=headers, timeout=10)
                )
                if len(pending) >= 500:
                    await asyncio.gather(*pending)
                    pending = []
        await asyncio.gather(*pending)
    finally:
        await nc.close()
    await _wait(db_url, "SELECT count(*) FROM messages", ROOMS * PER_ROOM)


async def _state_requests(nats_url: str, count: int) -> list[float]:
    """The archive's part alone: the one chat.userstate.state request a hello makes."""
    nc = await nats.connect(nats_url)
    samples = []
    try:
        request = pb.UserStateRequest(user="heavy", rooms=["lobby"], cap=100)
        payload, headers = codec.encode(request)
        for _ in range(count):
            started = time.perf_counter()
            await nc.request(names.USERSTATE_STATE, payload, timeout=10, headers=headers)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await nc.close()
    return sorted(samples)


async def _measure(port: int, token_fn: Any, hellos: int) -> dict[str, Any]:
    heavy, light = [], []
    welcome: dict[str, Any] = {}
    for i in range(hellos):
        ms, welcome = await _hello(port, token_fn("heavy"), [])
        heavy.append(ms)
        ms, _ = await _hello(port, token_fn(f"light{i}"), [])
        light.append(ms)
    unread = welcome.get("unread", [])
    return {
        "heavy_ms": sorted(heavy),
        "light_ms": sorted(light),
        "rooms_in_welcome": len(welcome.get("rooms", [])),
        "threads_with_unread": sum(1 for e in unread if e.get("unread")),
        "mentions": sum(e.get("mentions", 0) for e in unread),
    }


def userstate(ctx: Ctx) -> Run:
    hellos = ctx.scaled(300, 60)
    with Cluster(ctx.workdir / "userstate") as c:
        db = c.start_postgres()
        c.archive()
        c.presence()
        _, gw = c.gateway("gw-us")
        asyncio.run(_prepare(gw.port, c.start_nats(), db, ctx.token_fn))
        data = asyncio.run(_measure(gw.port, ctx.token_fn, hellos))
        data["state_request_ms"] = asyncio.run(_state_requests(c.start_nats(), hellos))
    heavy, light = data["heavy_ms"], data["light_ms"]
    expected_rooms = ROOMS + 1  # and the lobby
    figs = [
        Figure(
            f"hello p99, user in {ROOMS} rooms with unread counts",
            percentile(heavy, 99),
            "ms",
            baseline=percentile(light, 99),
            target=f"welcome lists {expected_rooms} rooms with counts",
            passed=data["rooms_in_welcome"] == expected_rooms
            and data["threads_with_unread"] == ROOMS,
        ),
        Figure(
            f"hello p50, user in {ROOMS} rooms",
            percentile(heavy, 50),
            "ms",
            baseline=percentile(light, 50),
        ),
        Figure(
            f"of which the archive's state request p50 ({ROOMS} rooms, via NATS)",
            percentile(data["state_request_ms"], 50),
            "ms",
        ),
    ]
    data["baseline"] = "hello of a user with nothing stored (lobby only), same system, same run"
    data["hellos"] = hellos
    return Run("userstate", figs, data)
