"""chatctl history / who / stats against the real archive and presence processes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from chatctl.client import ChatClient
from chatctl.errors import ChatError
from chatlib import codec, ids, names
from chatlib.proto.chat import v1 as pb
from devtools.processes import ServiceProcess
from devtools.servers import free_port, url_as
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from tests.chatctl_fixtures import provision, run_chatctl
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def url(nats_server: object) -> str:
    return str(nats_server.url)  # type: ignore[attr-defined]


@pytest.fixture
def archive(
    js: JetStreamContext, url: str, database_url: str, logs_dir: Path
) -> Iterator[ServiceProcess]:
    pytest.importorskip("archive.app", reason="the archive service is not written yet")
    port = free_port()
    env = {
        "ARCHIVE_NATS_SERVERS": url_as(url, "archive"),
        "ARCHIVE_DATABASE_URL": database_url,
        "ARCHIVE_HTTP_PORT": str(port),
    }
    proc = ServiceProcess("archive", env, port, logs_dir / "archive.log").start()
    yield proc
    proc.terminate()


@pytest.fixture
def presence(js: JetStreamContext, url: str, logs_dir: Path) -> Iterator[ServiceProcess]:
    pytest.importorskip("presence.app", reason="the presence service is not written yet")
    port = free_port()
    env = {"PRESENCE_NATS_SERVERS": url_as(url, "presence"), "PRESENCE_HTTP_PORT": str(port)}
    proc = ServiceProcess("presence", env, port, logs_dir / "presence.log").start()
    yield proc
    proc.terminate()


@pytest.fixture
async def client(js: JetStreamContext, url: str) -> AsyncIterator[ChatClient]:
    await provision(js)
    chat = await ChatClient.connect(url)
    yield chat
    await chat.close()


async def archived(client: ChatClient, **query: object) -> list[pb.ChatMessage]:
    try:
        return list((await client.history(**query)).messages)  # type: ignore[arg-type]
    except ChatError:
        return []  # history not serving yet


async def test_history_prints_a_rooms_archived_messages_oldest_first(
    archive: ServiceProcess, client: ChatClient, url: str
) -> None:
    for text in ("first", "second"):
        result = await run_chatctl("-s", url, "send", "--room", "ops", "--as", "bot", text)
        assert result.code == 0, result.err
    await wait_until(lambda: _count(client, room="ops", n=2), "both messages archived", timeout=20)
    result = await run_chatctl("-s", url, "history", "ops")
    assert result.code == 0, result.err
    lines = result.lines()
    assert [m["content"] for m in lines] == ["first", "second"]
    assert all(m["room"] == "ops" and m["sender"] == "bot" for m in lines)

    limited = await run_chatctl("-s", url, "history", "ops", "--limit", "1")
    assert [m["content"] for m in limited.lines()] == ["second"]
    assert f"--before {lines[1]['id']}" in limited.err  # how to get the older page


async def _count(client: ChatClient, n: int, **query: object) -> bool:
    return len(await archived(client, **query)) >= n


async def test_history_dm_shows_the_thread_to_either_participant(
    archive: ServiceProcess, client: ChatClient, url: str
) -> None:
    result = await run_chatctl("-s", url, "send", "--to", "bob", "--as", "alice", "hi bob")
    assert result.code == 0, result.err
    await wait_until(lambda: _count(client, dm=("alice", "bob"), n=1), "DM archived", timeout=20)
    for a, b in (("alice", "bob"), ("bob", "alice")):
        thread = await run_chatctl("-s", url, "history", "--dm", a, b)
        assert thread.code == 0, thread.err
        assert [m["content"] for m in thread.lines()] == ["hi bob"]
    other = await run_chatctl("-s", url, "history", "--dm", "carol", "bob")
    assert other.code == 0, other.err
    assert other.lines() == []


async def test_who_lists_users_online_and_stats_counts_them(
    presence: ServiceProcess, client: ChatClient, nc: NATS, url: str
) -> None:
    gateway = "gw-chatctl-test"
    for cid, user in (("c1", "ann"), ("c2", "bob")):
        payload, headers = codec.encode(
            pb.ConnectionOpened(gateway_id=gateway, connection_id=cid, user=user, ts_ms=1)
        )
        await nc.publish(names.PRESENCE_CONN_OPENED, payload, headers=headers)
    payload, headers = codec.encode(
        pb.Heartbeat(
            gateway_id=gateway,
            connections=[
                pb.Connection(connection_id="c1", user="ann"),
                pb.Connection(connection_id="c2", user="bob"),
            ],
        )
    )
    await nc.publish(names.heartbeat_subject(gateway), payload, headers=headers)

    async def both_online() -> bool:
        try:
            return await client.who() == ["ann", "bob"]
        except ChatError:
            return False

    await wait_until(both_online, "ann and bob online", timeout=15)
    plain = await run_chatctl("-s", url, "who")
    assert plain.code == 0, plain.err
    assert plain.out.split() == ["ann", "bob"]
    as_json = await run_chatctl("-s", url, "who", "--json")
    assert json.loads(as_json.out) == {"users": ["ann", "bob"], "total": 2}

    stats = await run_chatctl("-s", url, "stats", "--json")
    assert stats.code == 0, stats.err
    assert json.loads(stats.out)["presence"]["online"] == 2

    # Room members, as gateways record them (key <room>.<user>), with their presence.
    members = await client.js.key_value(names.KV_MEMBERS)
    for user in ("carol", "ann"):
        await members.put(names.member_key("dev", user), b"1")
    await members.put(names.member_key("other", "bob"), b"1")
    room = await run_chatctl("-s", url, "who", "--room", "dev")
    assert room.code == 0, room.err
    assert room.out.splitlines() == ["ann\tonline", "carol\toffline"]
    as_json = await run_chatctl("-s", url, "who", "--room", "dev", "--json")
    assert json.loads(as_json.out) == {
        "room": "dev",
        "members": [{"user": "ann", "online": True}, {"user": "carol", "online": False}],
        "total": 2,
    }
    lobby = await run_chatctl("-s", url, "who", "--room", "lobby")
    assert lobby.out.splitlines() == ["ann\tonline", "bob\tonline"]
    bad = await run_chatctl("-s", url, "who", "--room", "Not A Room")
    assert bad.code == 2 and bad.out == ""


async def test_stats_shows_the_archive_queue_drained_after_writes(
    archive: ServiceProcess, client: ChatClient, url: str
) -> None:
    for i in range(5):
        await client.send(room="ops", content=f"m{i}", sender="bot")
    await wait_until(lambda: _count(client, room="ops", n=5), "archived", timeout=20)

    async def drained() -> dict[str, object] | None:
        result = await run_chatctl("-s", url, "stats", "--json")
        queue = json.loads(result.out)["archive"]
        return queue if queue and queue["pending"] == 0 and queue["ack_pending"] == 0 else None

    queue = await wait_until(drained, "archive queue drained", timeout=20)
    assert queue == {
        "stream": names.STREAM_ARCHIVE,
        "consumer": names.CONSUMER_ARCHIVE,
        "pending": 0,
        "ack_pending": 0,
        "redelivered": 0,
        "waiting_pulls": queue["waiting_pulls"],  # type: ignore[index]
    }


async def test_search_finds_words_in_the_rooms_given_and_tail_decodes_lifecycle_events(
    archive: ServiceProcess, client: ChatClient, url: str
) -> None:
    """chatctl search (issue 14) through the real archive; `tail` shows an edit decoded."""
    for text, room in (("the deploy went fine", "ops"), ("deploy secrets", "private")):
        await run_chatctl("-s", url, "send", "--room", room, "--as", "bot", text)
    await wait_until(lambda: _count(client, room="private", n=1), "archived", timeout=20)
    result = await run_chatctl("-s", url, "search", "deploy", "--as", "alice", "--room", "ops")
    assert result.code == 0, result.err
    lines = result.lines()
    assert [line["room"] for line in lines] == ["ops"]  # not the room alice did not name
    assert "[[deploy]]" in lines[0]["snippet"]
    bad = await run_chatctl("-s", url, "search", "deploy", "--as", "Not A Name")
    assert bad.code == 2

    edit = pb.MessageEdit(id=ids.new_id(), message_id=ids.new_id(), room="ops", sender="bot",
                          content="fixed", ts_ms=1)  # fmt: skip
    data, headers = codec.encode(edit)
    tail = asyncio.create_task(run_chatctl("-s", url, "tail", "-n", "1", "chat.room.ops"))
    while not tail.done():  # until chatctl's subscription is in place and has seen one
        await client.nc.publish("chat.room.ops", data, headers=headers)
        await asyncio.sleep(0.2)
    shown = (await tail).lines()[0]
    assert shown["type"] == "chat.v1.MessageEdit"
    assert shown["data"]["content"] == "fixed" and shown["data"]["message_id"] == edit.message_id
