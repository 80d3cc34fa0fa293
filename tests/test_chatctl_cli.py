"""chatctl as an operator runs it: a real process against the real NATS server."""

from __future__ import annotations

import asyncio
import json

import pytest
from chatlib import codec, names
from chatlib.proto.chat import v1 as pb
from devtools.servers import free_port
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from tests.chatctl_fixtures import (
    provision,
    read_line,
    run_chatctl,
    start_chatctl,
)

pytestmark = pytest.mark.timeout(60)

EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_UNAVAILABLE = 4


@pytest.fixture
def url(nats_server: object) -> str:
    return str(nats_server.url)  # type: ignore[attr-defined]


async def test_every_command_has_help() -> None:
    for command in ("tail", "decode", "send", "history", "who", "stats"):
        result = await run_chatctl(command, "--help")
        assert result.code == 0, result.err
        assert "exit codes" in result.out
        assert command in result.out


async def test_unreachable_nats_fails_fast_with_exit_3_and_says_where() -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await run_chatctl("-s", dead, "who")
    assert result.code == EXIT_UNREACHABLE
    assert f"cannot reach NATS at {dead}" in result.err
    assert loop.time() - started < 10, "a CLI must not retry forever"


async def test_bad_room_or_user_name_is_a_usage_error_even_before_connecting(url: str) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    for args in (
        ("send", "--room", "Not A Room", "hi"),
        ("send", "--to", "bob.smith", "hi"),
        ("history", "no spaces"),
        ("history", "--dm", "alice", "BOB"),
        ("tail", "chat..room"),
    ):
        for server in (url, dead):
            result = await run_chatctl("-s", server, *args)
            assert result.code == EXIT_USAGE, (args, result.err)
            assert "bad " in result.err


async def test_send_stores_in_chat_and_prints_id_and_seq(js: JetStreamContext, url: str) -> None:
    await provision(js)
    result = await run_chatctl("-s", url, "send", "--room", "ops", "--as", "deploy-bot", "hello")
    assert result.code == 0, result.err
    [ack] = result.lines()
    stored = await js.get_msg(names.STREAM_CHAT, ack["seq"])
    assert stored.subject == names.room_subject("ops")
    message = codec.decode_as(pb.ChatMessage, stored.data or b"", stored.headers)
    assert (message.id, message.room, message.sender, message.content) == (
        ack["id"],
        "ops",
        "deploy-bot",
        "hello",
    )


async def test_send_dm_lands_on_the_sorted_pair_subject(js: JetStreamContext, url: str) -> None:
    await provision(js)
    result = await run_chatctl("-s", url, "send", "--to", "alice", "--as", "zed", "psst")
    assert result.code == 0, result.err
    stored = await js.get_msg(names.STREAM_CHAT, result.lines()[0]["seq"])
    assert stored.subject == names.dm_subject("alice", "zed") == "chat.dm.alice.zed"
    assert codec.decode_as(pb.ChatMessage, stored.data or b"", stored.headers).dm_peer == "alice"


async def test_send_retry_with_the_same_client_id_is_not_stored_twice(
    js: JetStreamContext, url: str
) -> None:
    await provision(js)
    args = ("-s", url, "send", "--room", "ops", "--client-id", "job-42", "once")
    first, second = await run_chatctl(*args), await run_chatctl(*args)
    assert first.code == second.code == 0
    assert first.lines() == [{"id": first.lines()[0]["id"], "seq": 1}]
    assert second.lines() == [{**first.lines()[0], "duplicate": True}]
    # The key reused for another message: refused, exit 1, nothing stored.
    other = await run_chatctl("-s", url, "send", "--room", "ops", "--client-id", "job-42", "twice")
    assert other.code == 1 and not other.out
    assert "job-42" in other.err and "different" in other.err
    assert (await js.stream_info(names.STREAM_CHAT)).state.messages == 1


async def test_send_without_the_chat_stream_is_service_unavailable(nc: NATS, url: str) -> None:
    result = await run_chatctl("-s", url, "send", "--room", "ops", "hi")
    assert result.code == EXIT_UNAVAILABLE
    assert names.STREAM_CHAT in result.err


async def test_tail_prints_a_published_chat_message_as_decoded_json(
    js: JetStreamContext, url: str
) -> None:
    await provision(js)
    proc = await start_chatctl("-s", url, "tail", "--count", "2", "live.chat.>", "presence.>")
    try:
        assert "watching" in await read_line(proc.stderr)  # subscribed: safe to publish
        message = pb.ChatMessage(id="01TEST", room="ops", sender="ann", content="hi", ts_ms=7)
        payload, headers = codec.encode(message)
        ack = await js.publish(names.room_subject("ops"), payload, headers=headers)
        online, online_headers = codec.encode(pb.UserOnline(user="ann", ts_ms=9))
        await js._nc.publish(names.online_subject("ann"), online, headers=online_headers)
        lines = [json.loads(await read_line(proc.stdout)) for _ in range(2)]
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    chat, presence = lines
    assert chat["subject"] == "live.chat.room.ops"
    assert chat["type"] == "chat.v1.ChatMessage"
    assert chat["seq"] == ack.seq
    assert chat["data"] == {
        "id": "01TEST",
        "room": "ops",
        "sender": "ann",
        "content": "hi",
        "ts_ms": 7,
    }
    assert chat["headers"][names.HEADER_TYPE] == "chat.v1.ChatMessage"
    assert "time" in chat
    assert presence["subject"] == "presence.event.online.ann"
    assert presence["data"] == {"user": "ann", "ts_ms": 9}


async def test_tail_shows_an_undecodable_payload_without_dying(nc: NATS, url: str) -> None:
    proc = await start_chatctl("-s", url, "tail", "--count", "2", "chat.>")
    try:
        assert "watching" in await read_line(proc.stderr)
        await nc.publish("chat.room.x", b"\xff\xfe", headers={names.HEADER_TYPE: "chat.v1.Nope"})
        await nc.publish("chat.room.y", b'{"not": "protobuf"}')
        bad = json.loads(await read_line(proc.stdout))
        plain = json.loads(await read_line(proc.stdout))
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "unknown payload type" in bad["error"]
    assert bad["data_base64"] == "//4="
    assert plain["json"] == {"not": "protobuf"}


async def test_decode_turns_protobuf_on_stdin_into_json() -> None:
    message = pb.ChatMessage(id="01X", dm_peer="bob", sender="ann", content="yo", ts_ms=1)
    by_type = await run_chatctl("decode", "--type", "chat.v1.ChatMessage", stdin=bytes(message))
    by_short = await run_chatctl("decode", "-t", "ChatMessage", stdin=bytes(message))
    by_header = await run_chatctl(
        "decode", "--header", "Chat-Type: chat.v1.ChatMessage", stdin=bytes(message)
    )
    expected = {"id": "01X", "dm_peer": "bob", "sender": "ann", "content": "yo", "ts_ms": 1}
    for result in (by_type, by_short, by_header):
        assert result.code == 0, result.err
        assert result.lines() == [expected]


async def test_decode_refuses_unknown_types_and_corrupt_bytes() -> None:
    unknown = await run_chatctl("decode", "--type", "chat.v1.Nope", stdin=b"")
    assert unknown.code == EXIT_USAGE
    assert "chat.v1.ChatMessage" in unknown.err  # lists what is known
    no_type = await run_chatctl("decode", stdin=b"")
    assert no_type.code == EXIT_USAGE
    corrupt = await run_chatctl("decode", "--type", "ChatMessage", stdin=b"\x0a\x05ab")
    assert corrupt.code == 1
    assert "ChatMessage" in corrupt.err


async def test_history_and_who_without_their_services_say_unavailable(
    js: JetStreamContext, url: str
) -> None:
    await provision(js)
    for args in (("history", "lobby"), ("history", "--dm", "ann", "bob"), ("who",)):
        result = await run_chatctl("-s", url, "--request-timeout", "2", *args)
        assert result.code == EXIT_UNAVAILABLE, (args, result.err)
        assert "not running" in result.err or "did not answer" in result.err


async def test_stats_reports_streams_and_missing_parts(js: JetStreamContext, url: str) -> None:
    await provision(js)
    for i in range(3):
        await js.publish(names.room_subject("ops"), bytes(pb.ChatMessage(id=f"m{i}")))
    await js.publish(names.DEAD_LETTER_ARCHIVE, b"bad")
    result = await run_chatctl("-s", url, "--request-timeout", "1", "stats", "--json")
    assert result.code == 0, result.err
    stats = json.loads(result.out)
    streams = {s["name"]: s for s in stats["streams"]}
    assert streams[names.STREAM_CHAT]["messages"] == 3
    assert streams[names.STREAM_CHAT]["last_seq"] == 3
    assert stats["dead_letters"] == 1
    assert stats["archive"] is None  # no archive has created its consumer
    assert stats["presence"] == {"kv_keys": 0, "online": None}  # presence not running

    table = await run_chatctl("-s", url, "--request-timeout", "1", "stats")
    assert table.code == 0, table.err
    assert names.STREAM_CHAT in table.out
    assert "dead letters (DEADLETTER): 1" in table.out
    assert "archive consumer ARCHIVE/archive-writer: missing" in table.out
