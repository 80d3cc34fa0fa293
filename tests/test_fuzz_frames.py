"""Fuzzing the gateway's WebSocket frame handling on a live system: whatever a client sends,
it gets error frames or valid answers, the gateway never crashes, and a bystander pair
keeps chatting meanwhile (DESIGN invariant 8).

Hypothesis generates the frames (bounded counts keep this fast); they are then played
against the running gateway from the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from devtools.servers import PostgresServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.system_fixtures import SystemRun, mint_token, system_run

SERVER_TYPES = {"welcome", "resumed", "joined", "left", "message", "ack", "history",
                "presence", "typing", "pong", "error"}  # fmt: skip
ERROR_CODES = {"bad_json", "unknown_type", "bad_frame", "bad_room", "bad_user",
               "content_too_large", "frame_too_large", "rate_limited", "not_joined",
               "send_failed", "history_unavailable", "presence_unavailable",
               "unauthorized", "forbidden"}  # fmt: skip
# Closes a fuzzing client may legitimately get: abuse, too big, too slow.
ALLOWED_CLOSES = {1008, 1009, 4008}
CLIENT_TYPES = ["hello", "join", "leave", "send", "dm", "history", "typing", "ping"]
FIELDS = ["room", "to", "with", "content", "client_id", "before", "limit", "rooms",
          "resume_seq", "token", "v", "sender"]  # fmt: skip

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=80),
    st.sampled_from(["lobby", "dev", "bob", "", "a" * 40, "Lobby", "a.b", "*", ">", "..."]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
frame_object = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(CLIENT_TYPES), json_value)},
    optional={name: json_value for name in FIELDS},
)
raw_frame = st.one_of(
    frame_object.map(json.dumps),
    frame_object.map(lambda f: json.dumps(f).encode()),  # a binary frame
    st.text(max_size=200),
    st.binary(max_size=200),
    json_value.map(json.dumps),
)


def generate_frames(count: int) -> list[list[str | bytes]]:
    """`count` batches of fuzzed frames, each batch played on one socket."""
    batches: list[list[str | bytes]] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(raw_frame, min_size=1, max_size=12))
    def collect(batch: list[str | bytes]) -> None:
        batches.append(batch)

    collect()
    return batches


@pytest.fixture(scope="module")
async def run(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresServer
) -> AsyncIterator[SystemRun]:
    # A generous rate limit: this fuzzes parsing, test_system_security covers floods.
    env = {"GATEWAY_RATE_PER_SECOND": "1000", "GATEWAY_RATE_BURST": "1000"}
    async with system_run(
        tmp_path_factory.mktemp("fuzz-frames"),
        pg_server.url,
        gateways=1,
        archives=1,
        presences=1,
        extra_env={"gateway": env},
    ) as running:
        yield running


def check_answer(frame_text: str | bytes, sent: list[str | bytes]) -> dict[str, Any]:
    frame = json.loads(frame_text)
    assert isinstance(frame, dict) and frame.get("type") in SERVER_TYPES, (frame, sent)
    if frame["type"] == "error":
        assert frame.get("code") in ERROR_CODES, (frame, sent)
    return frame


async def play(url: str, user: str, batch: list[str | bytes]) -> None:
    """Hello, the fuzzed frames, then ping: the answer must be pong, or a documented close."""
    ws = await connect(url, open_timeout=5, ping_interval=None, max_size=None)
    try:
        await ws.send(json.dumps({"type": "hello", "v": 1, "token": mint_token(user)}))
        check_answer(await asyncio.wait_for(ws.recv(), 5), [])
        for frame in batch:
            await ws.send(frame)
        await ws.send(json.dumps({"type": "ping"}))
        deadline = time.monotonic() + 10
        while True:
            answer = check_answer(
                await asyncio.wait_for(ws.recv(), deadline - time.monotonic()), batch
            )
            if answer["type"] == "pong":
                return
    except ConnectionClosed:
        assert ws.close_code in ALLOWED_CLOSES, (ws.close_code, batch)
    finally:
        await ws.close()


class Bystanders:
    """Two users chatting through it all; every message must arrive, promptly."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.round_trips = 0
        self.slowest = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        a = await connect(self.url, open_timeout=5, ping_interval=None)
        b = await connect(self.url, open_timeout=5, ping_interval=None)
        for ws, user in ((a, "bystander-a"), (b, "bystander-b")):
            await ws.send(json.dumps({"type": "hello", "v": 1, "token": mint_token(user)}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            await a.send(json.dumps({"type": "dm", "to": "bystander-b", "content": f"n{n}",
                                     "client_id": f"b{n}"}))  # fmt: skip
            while True:
                frame = json.loads(await asyncio.wait_for(b.recv(), 5))
                if frame.get("type") == "message" and frame.get("content") == f"n{n}":
                    break
            self.round_trips += 1
            self.slowest = max(self.slowest, time.monotonic() - started)
            await asyncio.sleep(0.05)
        await a.close()
        await b.close()


async def test_fuzzed_frames_get_only_error_frames_or_answers_and_others_chat_on(
    run: SystemRun,
) -> None:
    batches = await asyncio.to_thread(generate_frames, 120)
    stop = asyncio.Event()
    bystanders = Bystanders(run.ws_url())
    chatting = asyncio.create_task(bystanders.run(stop))
    try:
        # A few sockets at a time, like several hostile clients at once.
        for start in range(0, len(batches), 4):
            group = batches[start : start + 4]
            await asyncio.gather(
                *(play(run.ws_url(), f"fuzz{start + i}", b) for i, b in enumerate(group))
            )
            assert not chatting.done(), chatting.exception()
    finally:
        stop.set()
        await chatting
    assert run.system.alive("gateway-0")
    assert bystanders.round_trips >= 5
    assert bystanders.slowest < 3.0, f"a bystander waited {bystanders.slowest:.1f}s"
