"""Hostile clients against the whole system: each attack gets the documented answer and
changes nothing for anyone else (DESIGN invariants 7 and 8).

The NATS-permission side (what a compromised service may not publish or subscribe) is
tested against the deploy configuration in tests/test_deploy*.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from devtools.servers import PostgresServer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.system_fixtures import SystemRun, archived_id_counts, mint_token, system_run
from tests.waiting import wait_until

# Small limits so that floods and oversize frames are cheap to produce.
MAX_CONTENT = 1000
MAX_FRAME = 4000
HARD_FRAME = 16000
RATE, BURST, ABUSE = 20, 10, 15


@pytest.fixture(scope="module")
async def run(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresServer
) -> AsyncIterator[SystemRun]:
    gateway_env = {
        "GATEWAY_MAX_CONTENT_BYTES": str(MAX_CONTENT),
        "GATEWAY_MAX_FRAME_BYTES": str(MAX_FRAME),
        "GATEWAY_HARD_FRAME_BYTES": str(HARD_FRAME),
        "GATEWAY_RATE_PER_SECOND": str(RATE),
        "GATEWAY_RATE_BURST": str(BURST),
        "GATEWAY_ABUSE_MAX_VIOLATIONS": str(ABUSE),
        "GATEWAY_ALLOWED_ORIGINS": "https://chat.example",
    }
    async with system_run(
        tmp_path_factory.mktemp("security"),
        pg_server.url,
        gateways=2,
        archives=1,
        presences=1,
        extra_env={"gateway": gateway_env},
    ) as running:
        yield running


class Peer:
    """A bare socket: the attacks need frames no well-behaved client would send."""

    def __init__(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        self.ws, self.welcome = ws, welcome

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def next(self, kind: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """The next frame of `kind` whose fields match; other frames are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} frame matching {match} within {timeout}s")
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), left))
            if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
                return frame


async def join(
    url: str, user: str, rooms: list[str] | None = None, token: str | None = None
) -> Peer:
    ws = await connect(url, open_timeout=5, ping_interval=None)
    await ws.send(json.dumps({"type": "hello", "v": 1, "token": token or mint_token(user),
                              "rooms": rooms or []}))  # fmt: skip
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome", welcome
    return Peer(ws, welcome)


async def refused_hello(url: str, token: str) -> tuple[dict[str, Any], int | None]:
    """What a hello with `token` gets: the error frame and the close code."""
    ws = await connect(url, open_timeout=5, ping_interval=None)
    await ws.send(json.dumps({"type": "hello", "v": 1, "token": token, "rooms": []}))
    frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    return frame, ws.close_code


async def test_a_forged_sender_field_is_ignored_the_socket_user_is_the_sender(
    run: SystemRun,
) -> None:
    alice = await join(run.ws_url(0), "alice")
    bob = await join(run.ws_url(1), "bob")
    await alice.send({"type": "send", "room": "lobby", "content": "i am bob", "client_id": "f1",
                      "sender": "bob", "user": "bob", "from": "bob"})  # fmt: skip
    ack = await alice.next("ack", client_id="f1")
    seen = await bob.next("message", id=ack["id"])
    assert seen["sender"] == "alice"
    await alice.send({"type": "dm", "to": "carol", "content": "psst", "client_id": "f2",
                      "sender": "bob"})  # fmt: skip
    dm_ack = await alice.next("ack", client_id="f2")
    # Nor does the archive learn another sender: history shows alice as the sender.
    await wait_until(
        lambda: _archived(run, ack["id"], dm_ack["id"]), "both messages archived", timeout=15
    )
    await bob.send({"type": "history", "room": "lobby"})
    page = await bob.next("history", room="lobby")
    assert {m["id"]: m["sender"] for m in page["messages"]}[ack["id"]] == "alice"
    await alice.ws.close()
    await bob.ws.close()


async def _archived(run: SystemRun, *ids: str) -> bool:
    counts = await archived_id_counts(run.database_url)
    return all(counts[i] == 1 for i in ids)


async def test_nobody_reads_a_dm_thread_they_are_not_part_of(run: SystemRun) -> None:
    dave = await join(run.ws_url(0), "dave")
    erin = await join(run.ws_url(1), "erin")
    await dave.send({"type": "dm", "to": "erin", "content": "secret", "client_id": "s1"})
    secret = await dave.next("ack", client_id="s1")
    await erin.next("message", id=secret["id"])
    await wait_until(lambda: _archived(run, secret["id"]), "dm archived", timeout=15)

    mallory = await join(run.ws_url(0), "mallory")
    # Every way of naming someone else's thread yields mallory's own thread, or an error.
    attempts: list[dict[str, Any]] = [
        {"type": "history", "with": "erin", "requester": "dave"},
        {"type": "history", "with": "erin", "user": "dave", "sender": "dave"},
        {"type": "history", "with": "dave", "before": secret["id"]},
        {"type": "history", "with": "dave.erin"},
        {"type": "history", "with": "*"},
        {"type": "history", "room": "dm.dave.erin"},
    ]
    for attempt in attempts:
        await mallory.send(attempt)
        while True:
            frame = json.loads(await asyncio.wait_for(mallory.ws.recv(), 5))
            if frame["type"] in ("history", "error"):
                break
        if frame["type"] == "history":
            assert all(m["content"] != "secret" for m in frame["messages"]), (attempt, frame)
        else:
            assert frame["code"] in ("bad_user", "bad_room", "bad_frame", "forbidden"), frame
    # The participants still read it.
    await erin.send({"type": "history", "with": "dave"})
    page = await erin.next("history", 5.0, **{"with": "dave"})
    assert [m["id"] for m in page["messages"]] == [secret["id"]]
    for peer in (dave, erin, mallory):
        await peer.ws.close()


@pytest.mark.parametrize(
    "token_kind",
    ["expired", "forged", "unsigned", "garbage", "missing"],
)
async def test_a_bad_token_gets_unauthorized_and_close_4401(
    run: SystemRun, token_kind: str
) -> None:
    import jwt

    tokens = {
        "expired": mint_token("alice", now=time.time() - 10 * 24 * 3600),
        "forged": mint_token("alice", secret="not-the-server-secret-at-all-32b"),
        "unsigned": jwt.encode(
            {"sub": "alice", "iss": "natschat-guest", "exp": int(time.time()) + 600},
            key=None,  # type: ignore[arg-type]
            algorithm="none",
        ),
        "garbage": "not.a.token",
        "missing": "",
    }
    frame, code = await refused_hello(run.ws_url(0), tokens[token_kind])
    assert (frame["type"], frame["code"]) == ("error", "unauthorized")
    assert code == 4401


async def test_a_cross_origin_handshake_is_refused_with_403(run: SystemRun) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(run.ws_url(0), origin="https://evil.example", open_timeout=5)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    # The configured origin is let in.
    ws = await connect(run.ws_url(0), origin="https://chat.example", open_timeout=5)  # type: ignore[arg-type]
    await ws.close()


async def test_oversized_content_and_frames_get_errors_and_huge_frames_close_1009(
    run: SystemRun,
) -> None:
    frank = await join(run.ws_url(0), "frank")
    await frank.send({"type": "send", "room": "lobby", "content": "x" * (MAX_CONTENT + 1),
                      "client_id": "big"})  # fmt: skip
    await frank.next("error", code="content_too_large", ref="big")
    await frank.send({"type": "send", "room": "lobby", "content": "y" * (MAX_FRAME - 100),
                      "client_id": "pad", "pad": "z" * 200})  # fmt: skip
    await frank.next("error", code="frame_too_large")
    # Still serving after both.
    await frank.send({"type": "ping"})
    await frank.next("pong")
    await frank.send("w" * (HARD_FRAME + 10))
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(frank.ws.recv(), 5)
    assert frank.ws.close_code == 1009


async def test_a_flood_is_rate_limited_then_closed_1008_while_others_chat_on(
    run: SystemRun,
) -> None:
    flooder = await join(run.ws_url(0), "flooder")
    grace = await join(run.ws_url(0), "grace")
    heidi = await join(run.ws_url(1), "heidi")
    for i in range(BURST + ABUSE + 20):
        try:
            await flooder.send({"type": "send", "room": "lobby", "content": f"spam {i}",
                                "client_id": f"spam-{i}"})  # fmt: skip
        except ConnectionClosed:
            break
    frames: list[dict[str, Any]] = []
    with pytest.raises(ConnectionClosed):
        while True:
            frames.append(json.loads(await asyncio.wait_for(flooder.ws.recv(), 5)))
    assert flooder.ws.close_code == 1008
    assert any(f.get("code") == "rate_limited" for f in frames)
    # Others on the same gateway never noticed: grace's message reaches heidi at once.
    await grace.send({"type": "send", "room": "lobby", "content": "still here",
                      "client_id": "g1"})  # fmt: skip
    ack = await grace.next("ack", client_id="g1")
    await heidi.next("message", id=ack["id"])
    for peer in (grace, heidi):
        await peer.ws.close()
