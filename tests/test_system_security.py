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

import grpc
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
GUEST_HOLD = 3.0


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
        # Guest names lapse quickly once their holder has gone (the default is 60 s).
        "GATEWAY_GUEST_HOLD": str(GUEST_HOLD),
    }
    async with system_run(
        tmp_path_factory.mktemp("security"),
        pg_server.url,
        gateways=2,
        archives=1,
        presences=1,
        rpcs=1,
        extra_env={"gateway": gateway_env, "rpc": {"RPC_GUEST_HOLD": str(GUEST_HOLD)}},
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


# --- guest names: nobody speaks as a guest who is online ---------------------------------


def ask_guest_name(run: SystemRun, index: int, name: str) -> tuple[int, dict[str, Any]]:
    """POST /api/guest on gateway `index`: (status, body)."""
    import urllib.error
    import urllib.request

    url = run.ws_url(index).replace("ws://", "http://").removesuffix("/ws") + "/api/guest"
    request = urllib.request.Request(
        url, data=json.dumps({"name": name}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_a_second_guest_cannot_take_a_live_users_name(run: SystemRun) -> None:
    status, first = await asyncio.to_thread(ask_guest_name, run, 0, "ivy")
    assert status == 200
    ivy = await join(run.ws_url(0), "ivy", token=first["token"])
    # Another person asks for the same name, on either gateway: refused, with the code.
    for index in (0, 1):
        status, body = await asyncio.to_thread(ask_guest_name, run, index, "ivy")
        assert (status, body["error"]["code"]) == (409, "name_taken"), body
    # A valid guest token for ivy bound to another reservation (say, from someone who
    # held the name yesterday) cannot open a socket as ivy while she holds it.
    old = mint_token("ivy", holder="yesterdays-ivy")
    frame, code = await refused_hello(run.ws_url(1), old)
    assert (frame["code"], code) == ("name_taken", 4401)
    # Her own token works on every gateway (a second tab), and nothing she sees changed.
    second_tab = await join(run.ws_url(1), "ivy", token=first["token"])
    assert second_tab.welcome["user"] == "ivy"
    await ivy.send({"type": "send", "room": "lobby", "content": "still me", "client_id": "i1"})
    ack = await ivy.next("ack", client_id="i1")
    assert (await second_tab.next("message", id=ack["id"]))["sender"] == "ivy"
    # The name stays held while she is connected, well past the hold time: every attempt
    # over two hold periods is refused (the gateways refresh her reservation).
    deadline = time.monotonic() + 2 * GUEST_HOLD + 1
    attempts = 0
    while time.monotonic() < deadline:
        status, body = await asyncio.to_thread(ask_guest_name, run, attempts % 2, "ivy")
        assert status == 409, body
        attempts += 1
        await asyncio.sleep(0.25)  # pacing the attempts, not waiting for a condition
    assert attempts > 4
    await ivy.ws.close()
    await second_tab.ws.close()


async def test_a_guest_name_is_free_again_after_its_holder_left_and_their_token_is_not(
    run: SystemRun,
) -> None:
    status, first = await asyncio.to_thread(ask_guest_name, run, 0, "jack")
    assert status == 200
    jack = await join(run.ws_url(0), "jack", token=first["token"])
    await jack.ws.close()

    # Once the hold time has passed without any socket of his, someone else may have it.
    async def free() -> dict[str, Any] | None:
        status, body = await asyncio.to_thread(ask_guest_name, run, 1, "jack")
        return body if status == 200 else None

    second = await wait_until(free, "jack free again", timeout=GUEST_HOLD * 4)
    other = await join(run.ws_url(1), "jack", token=second["token"])
    # The first jack's token (still unexpired) no longer makes him jack: not on a socket,
    # not through the gRPC door either.
    frame, code = await refused_hello(run.ws_url(0), first["token"])
    assert (frame["type"], frame["code"], code) == ("error", "name_taken", 4401)
    status, details = await grpc_send(run, first["token"], "lobby", "i am jack")
    assert status == grpc.StatusCode.UNAUTHENTICATED and "name_taken" in details
    # The new jack's token works there.
    status, _ = await grpc_send(run, second["token"], "lobby", "the real jack")
    assert status == grpc.StatusCode.OK
    await other.ws.close()


async def grpc_send(run: SystemRun, token: str, room: str, content: str) -> tuple[Any, str]:
    """SendMessage through the rpc service with `token`: (status code, details)."""
    from tests.reference_protobuf import official

    ref = official()
    async with grpc.aio.insecure_channel(run.system.grpc_addresses()[0]) as channel:
        request = ref.ChatMessage(room=room, content=content, client_id=f"g-{time.time()}")
        try:
            await ref.ChatServiceStub(channel).SendMessage(
                request, metadata=[("authorization", f"Bearer {token}")], timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_guest_tokens_without_a_reservation_are_refused(run: SystemRun) -> None:
    import jwt

    from tests.system_fixtures import DEV_SECRET

    unbound = jwt.encode(
        {"sub": "kim", "iss": "natschat-guest", "exp": int(time.time()) + 600},
        DEV_SECRET,
        "HS256",
    )
    frame, code = await refused_hello(run.ws_url(0), unbound)
    assert (frame["code"], code) == ("unauthorized", 4401)
    assert "reservation" in frame["message"]


async def test_a_socket_is_closed_with_4401_when_its_token_expires_unless_renewed(
    run: SystemRun,
) -> None:
    now = time.time()
    # Tokens that expire in 6 s (issued 24 h - 6 s ago with the default lifetime).
    short = mint_token("liam", now=now - 24 * 3600 + 6)
    liam = await join(run.ws_url(0), "liam", token=short)
    mia_short = mint_token("mia", now=now - 24 * 3600 + 6)
    mia = await join(run.ws_url(0), "mia", token=mia_short)
    # mia sends a fresh token in time: confirmed, and her socket lives on.
    await mia.send({"type": "auth", "token": mint_token("mia")})
    confirmed = await mia.next("auth")
    assert confirmed["user"] == "mia" and confirmed["expires_at"] > (now + 3600) * 1000
    # Bad renewals are refused and change nothing: another user's token, garbage.
    await mia.send({"type": "auth", "token": mint_token("liam")})
    assert (await mia.next("error", ref="auth"))["code"] == "unauthorized"
    await mia.send({"type": "auth", "token": "garbage"})
    assert (await mia.next("error", ref="auth"))["code"] == "unauthorized"
    # liam did not: told why, then closed with 4401.
    err = await liam.next("error", timeout=20, code="unauthorized")
    assert "expired" in err["message"]
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(liam.ws.recv(), 5)
    assert liam.ws.close_code == 4401
    # mia is still served after liam's token (and her first one) expired.
    await mia.send({"type": "ping"})
    await mia.next("pong")
    await mia.ws.close()


async def test_every_page_response_carries_the_security_headers(run: SystemRun) -> None:
    import urllib.request

    base = run.ws_url(0).replace("ws://", "http://").removesuffix("/ws")
    for path, https in (("/", False), ("/static/app.js", False), ("/", True)):
        request = urllib.request.Request(base + path)
        if https:  # as the TLS-terminating proxy forwards it
            request.add_header("X-Forwarded-Proto", "https")
        headers = await asyncio.to_thread(_response_headers, request)
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert ("Strict-Transport-Security" in headers) == https


def _response_headers(request: Any) -> Any:
    import urllib.request

    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.headers
