"""Bad input gets its documented answer and changes nothing else (DESIGN invariant 8):
limits, malformed frames, tokens, origins. Gateways are real processes."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import websockets
from chatlib import names
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from nats.aio.client import Client as NATS

from tests.gateway_fixtures import (
    ChatClient,
    GatewayProc,
    clients,
    gateways,
    guest_token,
    http_json,
    start_gateways,
)

__all__ = ["gateways"]


async def assert_still_serving(client: ChatClient) -> None:
    before = len(client.matching(type="pong"))
    await client.send({"type": "ping"})
    await client.expect_count(before + 1, type="pong")


async def test_each_bad_frame_gets_its_error_code_and_the_connection_survives(
    gateways: list[GatewayProc],
) -> None:
    gw = gateways[0]
    async with clients(ChatClient.connect(gw, "alice"), ChatClient.connect(gw, "bob")) as (
        alice,
        bob,
    ):
        cases: list[tuple[Any, str]] = [
            ("{not json", "bad_json"),
            ("[1, 2]", "bad_json"),
            ({"no": "type"}, "bad_frame"),
            ({"type": "shout"}, "unknown_type"),
            ({"type": "join", "room": "Bad Room!"}, "bad_room"),
            ({"type": "join", "room": "x" * 33}, "bad_room"),
            ({"type": "send", "room": "lobby", "content": "no client id"}, "bad_frame"),
            ({"type": "send", "room": "lobby", "content": "", "client_id": "c1"}, "bad_frame"),
            ({"type": "send", "room": "nowhere", "content": "hi", "client_id": "c2"}, "not_joined"),
            ({"type": "dm", "to": "B@D", "content": "hi", "client_id": "c3"}, "bad_user"),
            ({"type": "dm", "to": "alice", "content": "me", "client_id": "c4"}, "bad_user"),
            (
                {"type": "send", "room": "lobby", "content": "x" * 4097, "client_id": "c5"},
                "content_too_large",
            ),
            ({"type": "history", "room": "lobby", "limit": 0}, "bad_frame"),
            ({"type": "typing"}, "bad_frame"),
        ]
        for frame, code in cases:
            before = len(alice.matching(type="error", code=code))
            await alice.send(frame)
            await alice.expect_count(before + 1, type="error", code=code)
            await assert_still_serving(alice)
        # Exactly 4 KiB of content is fine, one byte more was refused above.
        cid = await alice.send_room("lobby", "y" * 4096)
        await alice.expect(type="ack", client_id=cid)
        await bob.expect(type="message", sender="alice")
        assert len(bob.messages()) == 1  # none of the refused frames reached anyone
        err = alice.matching(code="content_too_large")[0]
        assert err["ref"] == "c5" and err["message"]


async def test_frames_over_the_limit_are_refused_and_far_over_it_close_the_socket(
    gateways: list[GatewayProc],
) -> None:
    gw = gateways[0]
    async with clients(ChatClient.connect(gw, "alice")) as (alice,):
        big = orjson.dumps({"type": "ping", "pad": "x" * (65 * 1024)}).decode()
        await alice.send(big)
        await alice.expect(type="error", code="frame_too_large")
        await assert_still_serving(alice)
        await alice.send("x" * (200 * 1024))  # over the hard limit (2 x max frame)
        assert await alice.expect_closed() == 1009


async def test_rate_limit_refuses_the_excess_and_closes_only_abusive_floods(
    gateways: list[GatewayProc],
) -> None:
    gw = gateways[0]
    async with clients(ChatClient.connect(gw, "alice"), ChatClient.connect(gw, "mallory")) as (
        alice,
        mallory,
    ):
        for _ in range(50):  # burst is 40: ~10 over, below the abuse threshold (20)
            await alice.send({"type": "typing", "room": "lobby"})
        errors = await alice.expect_count(1, type="error", code="rate_limited")
        assert errors[0]["ref"] == "typing"
        await assert_still_serving(alice)
        assert gw.metric("gateway_rate_limited_frames_total") >= 1

        for _ in range(200):
            await mallory.send({"type": "typing", "room": "lobby"})
        assert await mallory.expect_closed() == 1008
        await assert_still_serving(alice)


async def test_reads_and_writes_have_separate_budgets_and_both_count_towards_abuse(
    nc: NATS, nats_server: Any, logs_dir: Path
) -> None:
    """Issue 20: paging back (history, join, leave) never spends the budget for sending,
    and a burst of sends never blocks reading. Both buckets refill at 1 per 100 s here,
    so a token cannot come back while the test runs."""
    env = {
        "GATEWAY_RATE_PER_SECOND": "0.01",
        "GATEWAY_RATE_BURST": "3",
        "GATEWAY_READ_RATE_PER_SECOND": "0.01",
        "GATEWAY_READ_RATE_BURST": "5",
        "GATEWAY_ABUSE_MAX_VIOLATIONS": "12",
    }
    with start_gateways(nats_server.url, logs_dir, 1, env) as (gw,):
        status, config = await asyncio.to_thread(http_json, gw, "/api/config")
        assert status == 200
        limits = config["limits"]
        assert (limits["rate_per_second"], limits["rate_burst"]) == (0.01, 3)
        assert (limits["read_rate_per_second"], limits["read_rate_burst"]) == (0.01, 5)
        async with clients(
            ChatClient.connect(gw, "alice"),
            ChatClient.connect(gw, "bob"),
            ChatClient.connect(gw, "carol"),
        ) as (alice, bob, carol):
            # alice spends her whole read budget, and more, paging and joining.
            for _ in range(4):
                await alice.send({"type": "history", "room": "lobby", "limit": 10})
            await alice.send({"type": "join", "room": "dev"})
            await alice.send({"type": "leave", "room": "dev"})
            refused = await alice.expect_count(1, type="error", code="rate_limited")
            assert refused[0]["ref"] == "leave"
            # ... and can still send: three sends, three acks.
            for i in range(3):
                await alice.send_room("lobby", f"after paging {i}")
            await alice.expect_count(3, type="ack")
            assert len(alice.matching(type="error", code="rate_limited")) == 1

            # bob spends his whole write budget, and more ...
            for _ in range(4):
                await bob.send({"type": "typing", "room": "lobby"})
            await bob.expect(type="error", code="rate_limited", ref="typing")
            # ... and can still read.
            await bob.send({"type": "join", "room": "dev"})
            await bob.expect(type="joined", room="dev")
            await bob.send({"type": "leave", "room": "dev"})
            await bob.expect(type="left", room="dev")
            assert len(bob.matching(type="error", code="rate_limited")) == 1

            # Abuse accounting covers both: violations of either bucket add up.
            for _ in range(8):
                await carol.send({"type": "typing", "room": "lobby"})
            await carol.expect_count(5, type="error", code="rate_limited")
            assert carol.close_code is None
            for _ in range(13):
                await carol.send({"type": "join", "room": "dev"})
            assert await carol.expect_closed() == 1008
            await assert_still_serving(alice)


async def test_a_send_that_cannot_be_made_durable_gets_send_failed(
    gateways: list[GatewayProc], nc: NATS
) -> None:
    async with clients(ChatClient.connect(gateways[0], "alice")) as (alice,):
        await nc.jetstream().delete_stream(names.STREAM_CHAT)
        cid = await alice.send_room("lobby", "into the void")
        err = await alice.expect(type="error", code="send_failed", timeout=10)
        assert err["ref"] == cid
        assert not alice.matching(type="ack")
        assert gateways[0].metric("gateway_send_failures_total") == 1


def _hello(token: object) -> dict[str, Any]:
    return {"type": "hello", "v": 1, "token": token}


async def _refused_hello(gw: GatewayProc, frame: Any) -> ChatClient:
    client = await ChatClient.open(gw, "someone")
    await client.send(frame)
    await client.expect(type="error", code="unauthorized")
    assert await client.expect_closed() == 4401
    return client


async def test_missing_forged_or_expired_guest_tokens_are_refused_with_4401(
    gateways: list[GatewayProc],
) -> None:
    gw = gateways[0]
    now = int(time.time())
    forged = jwt.encode(
        {"sub": "alice", "iss": "natschat-guest", "exp": now + 60},
        "a-guessed-secret-that-is-long-enough",
        "HS256",
    )
    real = guest_token(gw, "alice")
    claims = jwt.decode(real, options={"verify_signature": False})
    secret = "dev-only-insecure-secret-change-me"  # the development default
    expired = jwt.encode({**claims, "exp": now - 10}, secret, "HS256")
    for frame in (
        _hello(None),
        _hello(""),
        _hello(forged),
        _hello(expired),
        _hello(real + "x"),
        {"type": "ping"},  # the first frame must be hello
        "not json",
    ):
        await _refused_hello(gw, frame)
    ok = await ChatClient.connect(gw, "alice", token=real)
    assert ok.welcome["user"] == "alice"
    await ok.close()


async def test_guest_names_are_validated(gateways: list[GatewayProc]) -> None:
    gw = gateways[0]
    for body in ({"name": "Not Valid"}, {"name": ""}, {}, [1]):
        status, answer = await asyncio.to_thread(http_json, gw, "/api/guest", body)
        assert status == 400
        assert answer["error"]["code"] == "bad_user"
    status, answer = await asyncio.to_thread(http_json, gw, "/api/guest", {"name": "alice"})
    assert status == 200 and answer["user"] == "alice" and answer["expires_at"] > 0


def guest_from(gw: GatewayProc, name: str, address: str) -> tuple[int, Any, str | None]:
    """POST /api/guest as a client at `address` (X-Forwarded-For, which a gateway believes
    from its own host by default): (status, body, Retry-After)."""
    request = urllib.request.Request(
        f"{gw.http_url}/api/guest",
        data=orjson.dumps({"name": name}),
        method="POST",
        headers={"X-Forwarded-For": address, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status), orjson.loads(resp.read()), resp.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return int(exc.code), orjson.loads(exc.read()), exc.headers.get("Retry-After")


async def test_guest_sign_ins_are_limited_per_address_and_a_refused_one_reserves_nothing(
    nats_server: Any, logs_dir: Path
) -> None:
    env = {"GATEWAY_GUEST_PER_MINUTE": "1", "GATEWAY_GUEST_BURST": "2"}
    with start_gateways(nats_server.url, logs_dir, 1, env) as (gw,):
        for name in ("gina", "gus"):
            status, _, _ = await asyncio.to_thread(guest_from, gw, name, "198.51.100.7")
            assert status == 200
        status, body, retry = await asyncio.to_thread(guest_from, gw, "gabe", "198.51.100.7")
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert retry is not None and 1 <= int(retry) <= 60, retry
        assert "try again" in body["error"]["message"]
        # Another address has its own allowance, and the refused name was not reserved.
        status, body, _ = await asyncio.to_thread(guest_from, gw, "gabe", "203.0.113.9")
        assert status == 200 and body["user"] == "gabe"
        # Bad names are answered as before, whatever the allowance.
        status, body, _ = await asyncio.to_thread(guest_from, gw, "Not Valid", "198.51.100.7")
        assert status == 400 and body["error"]["code"] == "bad_user"
        assert gw.metric("gateway_guest_rate_limited_total") == 1


async def test_a_websocket_from_another_origin_is_refused_before_accept(
    gateways: list[GatewayProc],
) -> None:
    gw = gateways[0]
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(gw.ws_url, origin="http://evil.example")  # type: ignore[arg-type]
    assert info.value.response.status_code == 403
    # Development default (empty allow-list): the page's own origin is fine.
    same = await ChatClient.connect(gw, "alice", origin=f"http://127.0.0.1:{gw.port}")  # type: ignore[arg-type]
    await same.close()


async def test_jwt_mode_verifies_the_identity_providers_tokens(
    nc: NATS, nats_server: Any, logs_dir: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    env = {
        "GATEWAY_AUTH_MODE": "jwt",
        "GATEWAY_JWT_ALGORITHM": "RS256",
        "GATEWAY_JWT_PUBLIC_KEY": public_pem.decode(),
        "GATEWAY_JWT_ISSUER": "https://idp.example",
        "GATEWAY_JWT_AUDIENCE": "chat",
        "GATEWAY_ALLOWED_ORIGINS": "https://chat.example",
        "GATEWAY_HELLO_TIMEOUT": "0.5",
    }
    now = int(time.time())
    good = {
        "sub": "u-123",
        "preferred_username": "alice",
        "iss": "https://idp.example",
        "aud": "chat",
        "exp": now + 60,
    }
    with start_gateways(nats_server.url, logs_dir, 1, env) as (gw,):
        token = jwt.encode(good, key, "RS256")
        alice = await ChatClient.connect(gw, "alice", token=token, origin="https://chat.example")  # type: ignore[arg-type]
        assert alice.welcome["user"] == "alice"
        await alice.close()
        for bad in (
            jwt.encode(good, other, "RS256"),  # forged
            jwt.encode({**good, "exp": now - 5}, key, "RS256"),  # expired
            jwt.encode({**good, "aud": "other"}, key, "RS256"),
            jwt.encode({**good, "iss": "https://evil.example"}, key, "RS256"),
            jwt.encode({k: v for k, v in good.items() if k != "exp"}, key, "RS256"),
            jwt.encode(good, "shared-secret-of-enough-length-32b", "HS256"),  # algorithm confusion
        ):
            await _refused_hello(gw, _hello(bad))
        # Silence after the handshake: closed once the hello timeout passes.
        silent = await ChatClient.open(gw, "silent")
        assert await silent.expect_closed() == 4401
        # Origins outside the allow-list are refused, even the gateway's own host.
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(gw.ws_url, origin=f"http://127.0.0.1:{gw.port}")  # type: ignore[arg-type]
        # No guest tokens in jwt mode.
        status, _ = await asyncio.to_thread(http_json, gw, "/api/guest", {"name": "bob"})
        assert status == 404
        status, config = await asyncio.to_thread(http_json, gw, "/api/config")
        assert (
            status == 200
            and config["auth_mode"] == "jwt"
            and config["limits"]["max_content_bytes"] == 4096
        )
