"""Fuzzing what the services consume from NATS: arbitrary bytes on the ARCHIVE work queue
are parked in DEADLETTER (or, if they happen to be valid, written), never stuck or crash
the archive; garbage on presence subjects is logged and dropped. Real traffic flows on."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from collections.abc import AsyncIterator

import pytest
from chatlib import codec, ids, names
from chatlib.proto.chat import v1 as pb
from devtools.servers import PostgresServer, nats_test_password
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from tests.reference_protobuf import ROOT, field_by_field, official, protobufjs, protobufjs_dir
from tests.system_fixtures import (
    SystemRun,
    archived_id_counts,
    mint_token,
    system_run,
    who_is_online,
)
from tests.waiting import wait_until

# Payloads found to break the decoder once (wrong wire types): always tried.
KNOWN_NASTY = [
    b"",
    b"\x0a\x02\x08\x00",
    b"\x08\x00\x00\x00",
    b"\x00\x00\x1a\x00",
    b"\x0a\x05abc",
    b"\xff" * 8,
]
HEADER_CHOICES = [None, "chat.v1.ArchiveTask", "chat.v1.ChatMessage", "chat.v1.Heartbeat",
                  "no.such.Type"]  # fmt: skip


def generate_payloads(count: int) -> list[tuple[bytes, str | None]]:
    out: list[tuple[bytes, str | None]] = []

    @settings(max_examples=count, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.binary(max_size=300), st.sampled_from(HEADER_CHOICES))
    def collect(data: bytes, header: str | None) -> None:
        out.append((data, header))

    collect()
    return out + [(b, h) for b in KNOWN_NASTY for h in HEADER_CHOICES[:3]]


def writable(data: bytes, header: str | None) -> bool:
    """Would a correct archive write this task? (A decodable task with a valid message.)"""
    try:
        task = codec.decode_as(pb.ArchiveTask, data, {names.HEADER_TYPE: header} if header else {})
    except Exception:
        return False
    m = task.message
    return bool(m and m.id and m.sender and (m.room or m.dm_peer))


@pytest.fixture(scope="module")
async def run(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresServer
) -> AsyncIterator[SystemRun]:
    async with system_run(
        tmp_path_factory.mktemp("fuzz-nats"), pg_server.url, gateways=1, archives=2, presences=2
    ) as running:
        yield running


async def chat_once(url: str, user: str, content: str) -> str:
    """Send one room message through the gateway; its acked id."""
    async with connect(url, open_timeout=5, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "hello", "v": 1, "token": mint_token(user)}))
        await ws.send(json.dumps({"type": "send", "room": "lobby", "content": content,
                                  "client_id": content}))  # fmt: skip
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame["type"] == "ack":
                return str(frame["id"])


async def test_garbage_on_the_archive_queue_is_parked_and_real_messages_still_land(
    run: SystemRun,
) -> None:
    payloads = await asyncio.to_thread(generate_payloads, 150)
    js = run.nc.jetstream()
    before = await chat_once(run.ws_url(), "alice", "before-garbage")
    for data, header in payloads:
        await js.publish(
            names.ARCHIVE_TASKS, data, headers={names.HEADER_TYPE: header} if header else None
        )
    after = await chat_once(run.ws_url(), "alice", "after-garbage")

    async def drained() -> bool:
        info = await js.stream_info(names.STREAM_ARCHIVE)
        return info.state.messages == 0

    await wait_until(drained, "the archive queue drains (nothing stuck)", timeout=15, interval=0.3)
    counts = await archived_id_counts(run.database_url)
    assert counts[before] == 1 and counts[after] == 1
    assert all(n == 1 for n in counts.values())
    dead = (await js.stream_info(names.STREAM_DEAD)).state.messages
    fuzz_rows = sum(counts.values()) - 2
    # Every fuzzed task is accounted for: parked, or (when valid) written once.
    assert dead + fuzz_rows == len(payloads), (dead, fuzz_rows, len(payloads))
    assert fuzz_rows <= sum(writable(d, h) for d, h in payloads)
    assert run.system.alive("archive-0") and run.system.alive("archive-1")


async def test_garbage_on_presence_subjects_changes_nothing_and_presence_keeps_serving(
    run: SystemRun,
) -> None:
    payloads = await asyncio.to_thread(generate_payloads, 100)
    subjects = [names.PRESENCE_CONN_OPENED, names.PRESENCE_CONN_CLOSED,
                names.heartbeat_subject("fuzz-gateway")]  # fmt: skip
    async with connect(run.ws_url(), open_timeout=5, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "hello", "v": 1, "token": mint_token("carol")}))
        await wait_until(lambda: _online(run, ["carol"]), "carol online", timeout=10)
        for i, (data, header) in enumerate(payloads):
            await run.nc.publish(
                subjects[i % len(subjects)],
                data,
                headers={names.HEADER_TYPE: header} if header else None,
            )
        await run.nc.flush()
        # Still exactly carol: garbage made no ghost and dropped no one.
        await wait_until(lambda: _online(run, ["carol"]), "still exactly carol", timeout=10)
    await wait_until(lambda: _online(run, []), "carol offline after she left", timeout=10)
    assert all(run.system.alive(n) for n in run.system.names_of("presence"))


async def _online(run: SystemRun, users: list[str]) -> bool:
    try:
        return await who_is_online(run.nc) == users
    except Exception:
        return False


async def test_a_message_from_another_protobuf_library_is_delivered_stored_and_served(
    run: SystemRun,
) -> None:
    """A producer that is not our encoder (protobufjs, fields in another order) gets its
    message delivered live, archived once and served by history; a history request with
    its fields out of order (Google's serializer, one field at a time) is answered."""
    message_id = ids.new_id()
    parts = [
        {"content": "hello from node", "ts_ms": 1_700_000_000_123},
        {"id": message_id, "room": "lobby", "sender": "nodebot"},
    ]
    data = bytes.fromhex(protobufjs("encode", "chat.v1.ChatMessage", json.dumps(parts)))
    headers = {names.HEADER_TYPE: "chat.v1.ChatMessage", names.HEADER_MSG_ID: message_id}
    async with connect(run.ws_url(), open_timeout=5, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "hello", "v": 1, "token": mint_token("alice")}))
        while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "welcome":
            pass
        ack = await run.nc.jetstream().publish(names.room_subject("lobby"), data, headers=headers)
        assert ack.stream == names.STREAM_CHAT
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame["type"] == "message":
                break
    assert (frame["id"], frame["content"], frame["seq"]) == (message_id, "hello from node", ack.seq)

    async def archived() -> bool:
        return (await archived_id_counts(run.database_url))[message_id] == 1

    await wait_until(archived, "the message is archived once", timeout=15, interval=0.2)
    ref = official().HistoryRequest(room="lobby", requester="alice", limit=10)
    request = field_by_field(ref, random.Random(3), explicit_defaults=True)
    assert request != ref.SerializeToString()
    reply = await run.nc.request(names.HISTORY_ROOM, request, timeout=5)
    assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.headers
    page = codec.decode_as(pb.HistoryPage, reply.data, dict(reply.headers or {}))
    assert [m.id for m in page.messages if m.id == message_id] == [message_id]


async def test_the_readmes_javascript_example_reads_a_history_page(run: SystemRun) -> None:
    """The nats.js + protobufjs example in the README runs as written and prints the page
    as the documented JSON (snake_case names, ts_ms a number)."""
    sent = await chat_once(run.ws_url(), "alice", "for-the-js-example")

    async def archived() -> bool:
        return (await archived_id_counts(run.database_url))[sent] == 1

    await wait_until(archived, "the message is in the archive", timeout=15, interval=0.2)
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### From other languages (JavaScript)", 1)[1]
    example = section.split("```js\n", 1)[1].split("```", 1)[0]
    folder = protobufjs_dir()
    script = folder / "readme_example.mjs"  # beside node_modules, so imports resolve
    script.write_text(example)
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            ["node", str(script)],
            cwd=ROOT,  # the example loads protos/ from the repository root
            env={
                **os.environ,
                "NATS_URL": f"nats://127.0.0.1:{run.nats.port}",
                "NATS_ADMIN_PASSWORD": nats_test_password("admin"),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        script.unlink()
    assert done.returncode == 0, done.stderr
    page = json.loads(done.stdout)
    mine = [m for m in page["messages"] if m["id"] == sent]
    assert mine and mine[0]["content"] == "for-the-js-example"
    assert mine[0]["dm_peer"] == "" and isinstance(mine[0]["ts_ms"], int)
