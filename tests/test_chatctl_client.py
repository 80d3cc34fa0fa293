"""The client library for services and bots: send, and stream = replay then live."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from chatctl.client import ChatClient, StreamedMessage
from chatctl.errors import IdempotencyConflict, NatsUnreachable, UsageError
from chatlib import names
from devtools.servers import free_port
from nats.js import JetStreamContext

from tests.chatctl_fixtures import provision
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def client(js: JetStreamContext, nats_server: object) -> AsyncIterator[ChatClient]:
    await provision(js)
    chat = await ChatClient.connect(str(nats_server.url))  # type: ignore[attr-defined]
    yield chat
    await chat.close()


async def take(stream: AsyncIterator[StreamedMessage], n: int) -> list[StreamedMessage]:
    out: list[StreamedMessage] = []

    async def collect() -> None:
        async for item in stream:
            out.append(item)
            if len(out) == n:
                return

    await asyncio.wait_for(collect(), 15)
    return out


async def test_connect_to_an_unreachable_server_raises_quickly() -> None:
    with pytest.raises(NatsUnreachable, match="cannot reach NATS"):
        await asyncio.wait_for(ChatClient.connect(f"nats://127.0.0.1:{free_port()}"), 10)


async def test_send_returns_id_and_seq_and_refuses_bad_names(client: ChatClient) -> None:
    msg_id, seq = await client.send(room="lobby", content="hi", sender="bot")
    assert len(msg_id) == 26 and seq == 1
    _, dm_seq = await client.send(to="ann", content="hey", sender="bot")
    assert dm_seq == 2
    with pytest.raises(UsageError):
        await client.send(room="Lobby!", content="x", sender="bot")
    with pytest.raises(UsageError):
        await client.send(room="lobby", to="ann", content="x", sender="bot")


async def test_a_client_id_is_an_idempotency_key_a_retry_replays_another_message_conflicts(
    client: ChatClient, js: JetStreamContext
) -> None:
    first = await client.send(room="lobby", content="hi", sender="bot", client_id="k1")
    assert first.duplicate is False
    again = await client.send(room="lobby", content="hi", sender="bot", client_id="k1")
    assert tuple(again) == tuple(first) and again.duplicate is True
    # Same key, another sender: another key (the key is sender + client_id).
    other_sender = await client.send(room="lobby", content="hi", sender="bob", client_id="k1")
    assert other_sender.seq == 2 and not other_sender.duplicate
    for room, to, content in (("lobby", None, "hi!"), ("dev", None, "hi"), (None, "ann", "hi")):
        with pytest.raises(IdempotencyConflict, match="k1"):
            await client.send(room=room, to=to, content=content, sender="bot", client_id="k1")
    assert (await js.stream_info(names.STREAM_CHAT)).state.messages == 2


async def test_stream_replays_from_since_then_continues_live_for_its_rooms_only(
    client: ChatClient,
) -> None:
    seqs = [(await client.send(room="dev", content=f"old{i}", sender="bot"))[1] for i in range(3)]
    await client.send(room="other", content="not mine", sender="bot")
    stream = client.stream(["dev"], since=seqs[0])
    replayed = await take(stream, 2)
    assert [m.seq for m in replayed] == seqs[1:]
    assert [m.message.content for m in replayed] == ["old1", "old2"]
    assert all(m.subject == "chat.room.dev" for m in replayed)
    await client.send(room="other", content="still not mine", sender="bot")
    _, live_seq = await client.send(room="dev", content="new", sender="bot")
    [live] = await take(stream, 1)
    assert (live.seq, live.message.content) == (live_seq, "new")
    await stream.aclose()  # type: ignore[attr-defined]


async def test_stream_without_since_is_live_only(client: ChatClient) -> None:
    await client.send(room="dev", content="before", sender="bot")
    before = (await client.js.stream_info(names.STREAM_CHAT)).state.consumer_count
    stream = client.stream(["dev"])
    first = asyncio.ensure_future(take(stream, 1))
    # The stream creates its consumer on first iteration; wait for it on the server.
    await _until_consumer(client, before)
    _, seq = await client.send(room="dev", content="after", sender="bot")
    [item] = await first
    assert (item.seq, item.message.content) == (seq, "after")
    await stream.aclose()  # type: ignore[attr-defined]


async def _until_consumer(client: ChatClient, before: int) -> None:
    """The stream's (ordered, ephemeral) consumer exists on CHAT."""

    async def consuming() -> bool:
        info = await client.js.stream_info(names.STREAM_CHAT)
        return info.state.consumer_count > before

    await wait_until(consuming, "a consumer on CHAT")


async def test_dm_stream_gets_both_directions_once_and_nobody_elses_dms(
    client: ChatClient,
) -> None:
    _, to_ann = await client.send(to="ann", content="to ann", sender="bob")
    await client.send(to="carl", content="not ann's", sender="bob")
    _, from_ann = await client.send(to="bob", content="from ann", sender="ann")
    _, self_note = await client.send(to="ann", content="note to self", sender="ann")
    stream = client.stream([], since=0, dm_user="ann")
    replayed = await take(stream, 3)
    assert [m.seq for m in replayed] == [to_ann, from_ann, self_note]
    _, live_self = await client.send(to="ann", content="live self", sender="ann")
    _, live_in = await client.send(to="ann", content="live in", sender="dan")
    live = await take(stream, 2)
    # A self-DM matches both DM wildcards; it must still arrive once.
    assert [m.seq for m in live] == [live_self, live_in]
    await stream.aclose()  # type: ignore[attr-defined]


async def test_stream_has_no_gap_and_no_duplicate_at_the_replay_live_seam(
    client: ChatClient,
) -> None:
    """Messages keep arriving while the stream switches from replay to live: the stream
    must yield exactly every sequence after `since`, in order, once."""
    for attempt in range(5):
        await check_seam(client, room=f"seam{attempt}", in_flight=20 + attempt * 10)


async def check_seam(client: ChatClient, room: str, in_flight: int) -> None:
    acked: list[int] = []
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            _, seq = await client.send(room=room, content=f"m{i}", sender="bot")
            acked.append(seq)
            # Interleave another room so the room's sequences are not contiguous.
            await client.send(room="noise", content=f"n{i}", sender="bot")
            i += 1

    publisher = asyncio.create_task(publish())
    await wait_until(lambda: len(acked) > in_flight, "messages in flight")
    since = acked[10]
    stream = client.stream([room], since=since)
    received: list[int] = []

    async def consume() -> None:
        # Well past what was published when the stream started: the seam is crossed
        # while the publisher is still going.
        async for item in stream:
            received.append(item.seq)
            if len(received) >= in_flight + 40:
                return

    try:
        await asyncio.wait_for(consume(), 20)
    finally:
        stop.set()
        await publisher
        await stream.aclose()  # type: ignore[attr-defined]
    expected = [s for s in acked if s > since][: len(received)]
    assert received == expected, f"{room}: seam broken"
