"""chatlib.nats_headers gives exactly nats-py's parse of message headers, faster."""

from __future__ import annotations

from chatlib import nats_headers
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

# Bytes that matter to the parser: separators, every kind of whitespace, non-ASCII and
# invalid UTF-8, and ordinary name characters.
INTERESTING = [
    b":", b"\r\n", b"\r", b"\n", b" ", b"\t", b"\x0b", b"\x0c", b"\x1c", b"\x1f",
    b"\x85", b"\xa0", b"\xc3\xa9", b"\xff", b"a", b"Z", b"-", b"0", b"Nats-Msg-Id",
]  # fmt: skip
blocks = st.lists(st.sampled_from(INTERESTING) | st.binary(max_size=4), max_size=30).map(b"".join)


@settings(max_examples=3000, deadline=None)
@given(blocks)
def test_any_header_block_parses_as_nats_py_parses_it(raw: bytes) -> None:
    assert nats_headers.parse_header_lines(raw) == NATS._parse_header_lines(raw)


def test_typical_headers_parse_as_nats_py_parses_them() -> None:
    raw = (
        b"Chat-Type: chat.v1.ArchiveTask\r\nNats-Msg-Id: 01J\r\n"
        b"Nats-Stream-Source: CHAT 42 > >\r\n\r\n"
    )
    assert nats_headers.parse_header_lines(raw) == NATS._parse_header_lines(raw)
    assert nats_headers.parse_header_lines(raw)["Nats-Stream-Source"] == "CHAT 42 > >"


async def test_a_connection_using_it_receives_the_same_headers(nc: NATS) -> None:
    nats_headers.use_on(nc)
    sub = await nc.subscribe("headers.test")
    headers = {"Chat-Type": "chat.v1.ChatMessage", "Nats-Msg-Id": "x y", "Empty": ""}
    await nc.publish("headers.test", b"payload", headers=headers)
    msg = await sub.next_msg(timeout=5)
    assert msg.headers == headers
    # Only this connection: nats-py's own parser is still the class's.
    assert NATS._parse_header_lines is not nats_headers.parse_header_lines
    await sub.unsubscribe()
