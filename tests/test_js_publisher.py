"""chatlib.js_publisher: durable publishes that share one reply subscription and one
timeout sweep give the same outcomes as nats-py's js.publish, against real NATS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import nats.errors
import pytest
from chatlib import js_publisher, names
from chatlib.js_publisher import JetStreamPublisher, parse_pub_ack
from devtools.servers import NatsServer
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NoStreamResponseError

from tests.tcp_proxy import TcpProxy
from tests.waiting import wait_until

# --- the PubAck reader, pinned to nats-py's ------------------------------------------------
REPLIES = [
    {"stream": "CHAT", "seq": 1},
    {"stream": "CHAT", "seq": 7, "duplicate": True},
    {"stream": "CHAT", "seq": 9, "domain": "hub"},
    {"stream": "CHAT", "seq": 3, "batch": "b1", "count": 4},
    {"stream": "CTR", "seq": 2, "val": "12"},
    {"stream": "CHAT", "seq": 5, "a_field_from_a_newer_server": {"x": 1}},
]


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: ",".join(r))
def test_a_pub_ack_reads_as_nats_py_reads_it(reply: dict[str, object]) -> None:
    data = json.dumps(reply).encode()
    assert parse_pub_ack(data) == api.PubAck.from_response(json.loads(data))


# As nats-server writes them (compact): the fast path reads these.
SERVER_REPLIES = [
    b'{"stream":"CHAT","seq":1}',
    b'{"stream":"CHAT","seq":18446744073709551615,"duplicate":true}',
    b'{"stream":"CHAT","seq":3,"duplicate":false}',
    b'{"stream":"CHAT","seq":4,"duplicate": true}',
    b'{"stream":"CHAT","domain":"hub","seq":9}',
    b'{"stream":"a\\"b","seq":1}',
]


@pytest.mark.parametrize("data", SERVER_REPLIES)
def test_a_compact_pub_ack_reads_as_nats_py_reads_it(data: bytes) -> None:
    assert parse_pub_ack(data) == api.PubAck.from_response(json.loads(data))


async def test_nats_server_writes_the_pub_ack_the_fast_path_reads(nc: NATS, stream: str) -> None:
    """If a server version changes the PubAck's bytes, the fast path stops matching: this
    says so (replies would still be read, by json, only slower)."""
    for _ in range(2):  # the second one is a duplicate
        reply = await nc.request("pubtest.z", b"x", headers={"Nats-Msg-Id": "z"}, timeout=5)
        assert js_publisher._COMMON_ACK.fullmatch(reply.data), reply.data


@pytest.mark.parametrize(
    "error",
    [
        {"code": 503, "err_code": 10077, "description": "maximum messages exceeded"},
        {"code": 400, "err_code": 10060, "description": "expected stream does not match"},
        {"code": 404, "err_code": 10059, "description": "stream not found"},
        {"code": 500, "description": "an error of a newer server"},
    ],
    ids=lambda e: str(e["code"]),
)
def test_an_error_reply_raises_the_api_error_nats_py_raises(error: dict[str, object]) -> None:
    with pytest.raises(APIError) as raised:
        parse_pub_ack(json.dumps({"error": error}).encode())
    with pytest.raises(APIError) as expected:
        APIError.from_error(dict(error))
    assert type(raised.value) is type(expected.value)
    assert str(raised.value) == str(expected.value)


# --- against real NATS --------------------------------------------------------------------
@pytest.fixture
async def stream(js: JetStreamContext) -> str:
    await js.add_stream(name="PUBTEST", subjects=["pubtest.>"], duplicate_window=60)
    return "PUBTEST"


@pytest.fixture
async def publisher(nc: NATS) -> AsyncIterator[JetStreamPublisher]:
    pub = JetStreamPublisher(nc, timeout=2.0)
    await pub.start()
    yield pub
    await pub.stop()


async def test_each_publish_is_acked_with_its_stream_sequence(
    publisher: JetStreamPublisher, stream: str, js: JetStreamContext
) -> None:
    acks = await asyncio.gather(
        *(publisher.publish(f"pubtest.{i}", b"m%d" % i, stream=stream) for i in range(50))
    )
    # One connection keeps the publish order, so the sequences follow it.
    assert [a.seq for a in acks] == list(range(1, 51))
    assert {a.stream for a in acks} == {stream}
    assert not any(a.duplicate for a in acks)
    assert (await js.get_msg(stream, 17)).data == b"m16"
    assert publisher.in_flight == 0


async def test_a_repeated_msg_id_is_acked_as_a_duplicate_of_the_original(
    publisher: JetStreamPublisher, stream: str, js: JetStreamContext
) -> None:
    first = await publisher.publish("pubtest.a", b"one", {"Nats-Msg-Id": "k1"}, stream=stream)
    again = await publisher.publish("pubtest.a", b"two", {"Nats-Msg-Id": "k1"}, stream=stream)
    assert (first.seq, first.duplicate) == (1, None)
    assert (again.seq, again.duplicate) == (1, True)
    assert (await js.stream_info(stream)).state.messages == 1


async def test_a_publish_the_stream_refuses_raises_its_api_error(
    publisher: JetStreamPublisher, stream: str
) -> None:
    # Expected stream OTHER: JetStream stores nothing and answers with an error.
    with pytest.raises(APIError) as raised:
        await publisher.publish("pubtest.a", b"x", stream="OTHER")
    assert raised.value.err_code == 10060  # expected stream does not match


async def test_a_subject_no_stream_stores_raises_no_stream_response(
    publisher: JetStreamPublisher,
) -> None:
    with pytest.raises(NoStreamResponseError):
        await publisher.publish("nostream.a", b"x")
    assert publisher.in_flight == 0


# --- core requests on the same reply subscription, pinned to nc.request ------------------
async def test_a_request_gets_the_reply_nc_request_gets(
    nc: NATS, publisher: JetStreamPublisher
) -> None:
    async def echo(msg: Msg) -> None:
        assert msg.reply
        await nc.publish(
            msg.reply, b"re:" + msg.data, headers={"Kind": (msg.headers or {})["Kind"]}
        )

    await nc.subscribe("echo.a", cb=echo)
    await nc.flush()
    ours = await publisher.request("echo.a", b"x", {"Kind": "k"})
    theirs = await nc.request("echo.a", b"x", headers={"Kind": "k"}, timeout=2)
    assert (ours.data, ours.headers) == (theirs.data, theirs.headers) == (b"re:x", {"Kind": "k"})
    assert publisher.in_flight == 0


async def test_a_request_nobody_listens_to_raises_no_responders_as_nc_request_does(
    nc: NATS, publisher: JetStreamPublisher
) -> None:
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request("nobody.a", b"x", timeout=2)
    with pytest.raises(nats.errors.NoRespondersError):
        await publisher.request("nobody.a", b"x")
    assert publisher.in_flight == 0


async def test_an_unanswered_request_times_out_and_frees_its_slot(nc: NATS) -> None:
    await _silent_responder(nc, "silent.r")
    pub = JetStreamPublisher(nc, timeout=0.3, max_in_flight=1)
    await pub.start()
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await pub.request("silent.r", b"x")
        assert pub.in_flight == 0
        with pytest.raises(nats.errors.TimeoutError):  # the slot came back
            await pub.request("silent.r", b"y")
    finally:
        await pub.stop()


async def _silent_responder(nc: NATS, subject: str) -> None:
    """Someone listens on the subject but never answers (a stream leader that is gone
    while its interest remains): the publish can only time out."""
    await nc.subscribe(subject, cb=_ignore)
    await nc.flush()


async def _ignore(msg: object) -> None:
    return None


async def test_a_publish_without_an_answer_times_out_and_frees_its_slot(nc: NATS) -> None:
    await _silent_responder(nc, "silent.a")
    pub = JetStreamPublisher(nc, timeout=0.3, max_in_flight=1)
    await pub.start()
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await pub.publish("silent.a", b"x")
        assert pub.in_flight == 0
        with pytest.raises(nats.errors.TimeoutError):  # the slot came back
            await pub.publish("silent.a", b"y")
    finally:
        await pub.stop()


async def test_no_more_than_max_in_flight_publishes_wait_at_once(nc: NATS, stream: str) -> None:
    held: list[Msg] = []

    async def hold(msg: Msg) -> None:  # answers later, when the test says so
        held.append(msg)

    await nc.subscribe("held.b", cb=hold)
    pub = JetStreamPublisher(nc, timeout=5.0, max_in_flight=2)
    await pub.start()
    try:
        first = [asyncio.create_task(pub.publish("held.b", b"x")) for _ in range(2)]
        await wait_until(lambda: len(held) == 2, "two publishes out")
        # A third waits for a slot: it is not published while the window is full ...
        third = asyncio.create_task(pub.publish("pubtest.c", b"z", stream=stream))
        await asyncio.sleep(0.2)
        assert pub.in_flight == 2 and not third.done()
        # ... and goes out as soon as one of the first two is acked.
        await held[0].respond(b'{"stream":"HELD","seq":1}')
        assert (await first[0]).stream == "HELD"
        assert (await third).seq == 1
        await held[1].respond(b'{"stream":"HELD","seq":2}')
        assert (await first[1]).seq == 2
    finally:
        await pub.stop()


async def test_a_publish_that_fails_to_go_out_gives_its_slot_back(nc: NATS, stream: str) -> None:
    # nats-py 2.16's publish_async keeps the slot of a publish that raised; this must not.
    pub = JetStreamPublisher(nc, timeout=2.0, max_in_flight=1)
    await pub.start()
    try:
        with pytest.raises(nats.errors.BadSubjectError):
            await pub.publish("", b"x")
        assert pub.in_flight == 0
        assert (await pub.publish("pubtest.d", b"y", stream=stream)).seq == 1
    finally:
        await pub.stop()


@pytest.fixture
async def proxied_nc(nats_server: NatsServer) -> AsyncIterator[tuple[NATS, TcpProxy]]:
    """A client that reaches NATS through a TCP proxy the test can reset or stall."""
    proxy = TcpProxy(nats_server.port).start()
    url = nats_server.url.replace(f":{nats_server.port}", f":{proxy.port}")
    client = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    yield client, proxy
    await client.close()
    proxy.stop()


async def test_acks_arrive_after_the_connection_to_nats_is_reset(
    proxied_nc: tuple[NATS, TcpProxy], stream: str
) -> None:
    """The reply subscription survives a reconnect (nats-py subscribes it again)."""
    client, proxy = proxied_nc
    pub = JetStreamPublisher(client, timeout=2.0)
    await pub.start()
    try:
        assert (await pub.publish("pubtest.e", b"1", stream=stream)).seq == 1
        reconnects = client.stats["reconnects"]
        await asyncio.to_thread(proxy.reset_once)
        await wait_until(
            lambda: client.stats["reconnects"] > reconnects and client.is_connected, "reconnected"
        )
        assert (await pub.publish("pubtest.e", b"2", stream=stream)).seq == 2
    finally:
        await pub.stop()


async def test_a_publish_times_out_while_nats_does_not_answer(
    proxied_nc: tuple[NATS, TcpProxy], stream: str
) -> None:
    client, proxy = proxied_nc
    pub = JetStreamPublisher(client, timeout=0.5)
    await pub.start()
    try:
        await asyncio.to_thread(proxy.stall)
        with pytest.raises(nats.errors.TimeoutError):
            await pub.publish("pubtest.f", b"x", stream=stream)
        assert pub.in_flight == 0
    finally:
        await asyncio.to_thread(proxy.set_pass)
        await pub.stop()


async def test_submit_hands_back_the_future_its_pub_ack_settles(nc: NATS, stream: str) -> None:
    """The gateway's durable sends add a callback to it (no task per send)."""
    pub = JetStreamPublisher(nc, timeout=2.0, max_in_flight=1)
    await pub.start()
    try:
        pending = await pub.submit("pubtest.g", b"x", stream=stream)
        assert pub.in_flight == 1 and not pending.done()
        settled: list[api.PubAck] = []
        pending.add_done_callback(lambda f: settled.append(f.result()))
        await wait_until(lambda: settled, "acked")
        assert settled[0].seq == 1 and pub.in_flight == 0
        # Its slot came back with the PubAck: the one-slot window takes the next.
        assert (await asyncio.wait_for(pub.publish("pubtest.g", b"y", stream=stream), 2)).seq == 2
    finally:
        await pub.stop()


async def test_stop_fails_the_publishes_waiting_for_a_slot(nc: NATS) -> None:
    await _silent_responder(nc, "silent.h")
    pub = JetStreamPublisher(nc, timeout=30.0, max_in_flight=1)
    await pub.start()
    out = await pub.submit("silent.h", b"x")
    waiting = asyncio.create_task(pub.publish("silent.h", b"y"))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await pub.stop()
    for outcome in (out, waiting):
        with pytest.raises(nats.errors.ConnectionClosedError):
            await asyncio.wait_for(outcome, 2)


async def test_on_the_services_client_pub_acks_are_read_without_a_task(
    nats_server: NatsServer, nc: NATS, stream: str
) -> None:
    """The services' client hands PubAcks to the publisher as they are read
    (chatlib.nats_client.subscribe_handler): the same outcomes."""
    from chatlib import nats_client, nats_wiring
    from chatlib.settings import CommonSettings

    ours = await nats_wiring.connect(CommonSettings(nats_servers=[nats_server.url]), "pub-test")
    assert isinstance(ours, nats_client.Client)
    pub = JetStreamPublisher(ours, timeout=2.0, max_in_flight=8)
    await pub.start()
    try:
        acks = await asyncio.gather(
            *(pub.publish(f"pubtest.{i}", b"m%d" % i, stream=stream) for i in range(50))
        )
        assert [a.seq for a in acks] == list(range(1, 51))
        with pytest.raises(APIError):
            await pub.publish("pubtest.a", b"x", stream="OTHER")
        with pytest.raises(NoStreamResponseError):
            await pub.publish("nostream.a", b"x")
        assert pub.in_flight == 0
    finally:
        await pub.stop()
        await ours.close()


async def test_a_kv_key_written_through_the_publisher_is_what_kv_put_writes(
    js: JetStreamContext, publisher: JetStreamPublisher
) -> None:
    """The gateway's roster writes memberships this way (names.kv_subject): the key must
    read back through nats-py's KeyValue as if kv.put had written it."""
    kv = await js.create_key_value(bucket="kvpub")
    ack = await publisher.publish(names.kv_subject("kvpub", "r1.alice"), b"1")
    entry = await kv.get("r1.alice")
    assert (entry.value, entry.revision) == (b"1", ack.seq)
    assert await kv.put("r1.alice", b"1") == ack.seq + 1  # the same key's next revision
