"""chatlib.nats_client: the services' NATS client reads message headers exactly as
nats-py's own reader does (it only remembers which names it has checked)."""

from __future__ import annotations

from collections.abc import Callable

import nats
import pytest
from chatlib import nats_client, nats_wiring
from chatlib.settings import CommonSettings
from devtools.servers import NatsServer
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as LibraryClient
from nats.aio.msg import Msg
from nats.errors import BadHeaderError, BadSubjectError

from tests.waiting import wait_until

library_parse = LibraryClient._parse_header_lines

REPUBLISHED = (
    b"Chat-Type: chat.v1.ChatMessage\r\nNats-Msg-Id: u1:c1\r\n"
    b"Chat-Request-Hash: b2:00112233445566778899aabbccddeeff\r\n"
    b"Nats-Expected-Stream: CHAT\r\nNats-Stream: CHAT\r\nNats-Subject: chat.room.r1\r\n"
    b"Nats-Sequence: 42\r\nNats-Time-Stamp: 2026-12-02T03:00:00.123456789Z\r\n"
    b"Nats-Last-Sequence: 41\r\n\r\n"
)

ODD = [
    b"",
    b"\r\n\r\n",
    b"a:b",  # no space after the colon
    b"a:\tb \r\n",  # tab before, space after the value
    b" spaced : value \r\n",  # whitespace around the name is trimmed
    b"in side: x\r\n",  # whitespace inside the name: skipped
    b"sep\x1carator: x\r\n",  # \x1c is whitespace to str.isspace
    b"\xc3\xa9t\xc3\xa9: x\r\n",  # non-ASCII name: skipped
    b"v: \xff\xfe bad utf-8\r\n",  # bad UTF-8 value: U+FFFD
    b"v: \xc3\xa9t\xc3\xa9\r\n",  # UTF-8 value
    b"no colon here\r\nk: v\r\n",
    b": empty name\r\n",
    b"k: first\r\nk: second\r\n",  # the last one wins
    b"k: a:b:c\r\n",  # colons in the value
    b"k:\r\n",  # empty value
    REPUBLISHED,
]


@pytest.mark.parametrize("raw", ODD)
def test_headers_read_as_nats_py_reads_them(raw: bytes) -> None:
    assert nats_client.parse_header_lines(raw) == library_parse(raw)
    # ... and again, once the names are remembered.
    assert nats_client.parse_header_lines(raw) == library_parse(raw)


LINE = st.binary(max_size=12) | st.sampled_from(
    [b"Nats-Sequence: 7", b" k : v ", b"a b: c", b"\x1ck: v", b"k:\xff", b":", b""]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(LINE, max_size=8), st.sampled_from([b"\r\n", b"\n", b"\r"]))
def test_any_header_block_reads_as_nats_py_reads_it(lines: list[bytes], sep: bytes) -> None:
    raw = sep.join(lines)
    assert nats_client.parse_header_lines(raw) == library_parse(raw)


async def test_services_connect_with_the_cheaper_reader_and_headers_arrive(
    nats_server: NatsServer,
) -> None:
    settings_ = CommonSettings(nats_servers=[nats_server.url])
    nc = await nats_wiring.connect(settings_, "header-test")
    try:
        assert isinstance(nc, nats_client.Client)
        sub = await nc.subscribe("hdr.test")
        await nc.publish("hdr.test", b"x", headers={"Chat-Type": "t", "Nats-Msg-Id": "m1"})
        msg = await sub.next_msg(timeout=5)
        assert msg.headers == {"Chat-Type": "t", "Nats-Msg-Id": "m1"}
    finally:
        await nc.close()


def test_the_library_reader_is_still_where_we_replace_it() -> None:
    """nats-py calls `self._parse_header_lines`; if a new version renames it, this fails
    rather than our reader silently going unused."""
    import inspect

    assert "self._parse_header_lines(" in inspect.getsource(LibraryClient._process_headers)


# --- publish_now: nats-py's publish, synchronously ------------------------------------------
def library_command(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> bytes:
    """The command nats-py's `_send_publish` queues (run to its end without a loop: on a
    client that is not connected it never waits)."""
    client = LibraryClient()
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    client._send_command = capture  # type: ignore[method-assign]
    coro = client._send_publish(subject, reply, payload, len(payload), headers)
    with pytest.raises(StopIteration):
        coro.send(None)
    return sent[0]


def outcome(make: Callable[[], bytes]) -> bytes | type[BaseException]:
    try:
        return make()
    except Exception as exc:
        return type(exc)


HEADER_NAMES = st.sampled_from(
    ["Nats-Msg-Id", "Chat-Type", " Padded ", "", " ", "bad name", "a:b", "\u00e9", "k\t"]
) | st.text(max_size=6)
HEADER_VALUES = st.sampled_from(
    ["v", " v ", "a\r\nb", "\u2003x\u2003", "\u00e9\u00e9", ""]
) | st.text(max_size=12)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["chat.room.r1", "s"]),
    st.sampled_from(["", "_INBOX.abc.7"]),
    st.binary(max_size=20),
    st.none() | st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=5),
)
def test_the_publish_command_is_the_one_nats_py_queues(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> None:
    for _ in range(2):  # the second time with the names remembered
        expected = outcome(lambda: library_command(subject, reply, payload, headers))
        assert outcome(lambda: nats_client.publish_command(subject, reply, payload, headers)) == (
            expected
        )


async def test_publish_now_queues_and_sends_what_nats_py_does(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("pubnow.>")
        cases: list[tuple[str, str, bytes, dict[str, str] | None]] = [
            ("pubnow.a", "", b"plain", None),
            ("pubnow.b", "_INBOX.x.1", b"", {"Chat-Type": "t", " Nats-Msg-Id ": " u:c\r\n "}),
            ("pubnow.c", "", b"\x00\xff", {"": "skipped", "K": "\u00e9"}),
        ]
        for subject, reply, payload, headers in cases:
            before = len(nc._pending), dict(nc.stats)
            await nc.publish(subject, payload, reply, dict(headers) if headers else None)
            theirs = nc._pending[before[0] :], nc.stats["out_msgs"] - before[1]["out_msgs"]
            before = len(nc._pending), dict(nc.stats)
            assert nats_client.publish_now(nc, subject, payload, reply, headers)
            ours = nc._pending[before[0] :], nc.stats["out_msgs"] - before[1]["out_msgs"]
            # Unless the flusher ran in between (it empties _pending), both queued one.
            assert ours == theirs or not theirs[0]
            assert ours[0] == [nats_client.publish_command(subject, reply, payload, headers)]
            # The flusher was woken: both copies arrive, alike.
            first, second = await sub.next_msg(timeout=5), await sub.next_msg(timeout=5)
            assert (first.subject, first.reply, first.data, first.headers) == (
                second.subject,
                second.reply,
                second.data,
                second.headers,
            )
        # Refusals are nats-py's.
        for subject, reply in (("bad subject", ""), ("pubnow.d", "bad\r\nreply"), ("", "")):
            with pytest.raises(BadSubjectError):
                nats_client.publish_now(nc, subject, b"x", reply)
        with pytest.raises(BadHeaderError):
            nats_client.publish_now(nc, "pubnow.e", b"x", headers={"bad name": "v"})
        nc._skip_subject_validation = True  # an empty subject is still refused
        with pytest.raises(BadSubjectError):
            nats_client.publish_now(nc, "", b"x")
        nc._skip_subject_validation = False
        # Where nats-py might wait or raise otherwise, nothing is done: it is left to it.
        assert not nats_client.publish_now(nc, "pubnow.f", b"x" * (nc.max_payload + 1))
    finally:
        await nc.close()
    assert not nats_client.publish_now(nc, "pubnow.g", b"x")  # closed


# --- subscribe_handler: messages to a plain function as they are read -----------------------
@pytest.mark.parametrize("ours", [True, False], ids=["our-client", "nats-py-client"])
async def test_a_handler_gets_every_message_in_order_until_unsubscribed(
    nats_server: NatsServer, ours: bool
) -> None:
    if ours:
        nc = await nats_wiring.connect(CommonSettings(nats_servers=[nats_server.url]), "h-test")
    else:
        nc = await nats.connect(nats_server.url)
    got: list[tuple[str, bytes, dict[str, str] | None]] = []

    def handler(msg: Msg) -> None:
        if msg.data == b"boom":
            raise RuntimeError("a handler's bug")  # logged; the connection goes on
        got.append((msg.subject, msg.data, msg.headers))

    try:
        sub = await nats_client.subscribe_handler(nc, "handled.>", handler)
        await nc.publish("handled.a", b"1", headers={"Nats-Sequence": "1"})
        await nc.publish("handled.b", b"boom")
        for i in range(2, 6):
            await nc.publish("handled.a", b"%d" % i)
        await wait_until(lambda: len(got) == 5, "five handled")
        assert got[0] == ("handled.a", b"1", {"Nats-Sequence": "1"})
        assert [data for _, data, _ in got] == [b"1", b"2", b"3", b"4", b"5"]
        assert sub.pending_msgs == 0 and nc.is_connected
        assert nats_client.queues_messages(nc) is not ours
        if ours:
            assert nc._handlers[sub._id] is handler
            assert nc.stats["in_msgs"] == 6  # counted as nats-py counts them
        await sub.unsubscribe()
        await nc.publish("handled.a", b"late")
        await nc.flush()
        await nc.publish("handled.a", b"later")  # a round trip later: nothing came
        await nc.flush()
        assert len(got) == 5
    finally:
        await nc.close()
