"""Any valid protobuf encoding is accepted, whoever wrote it: Google's serializer with the
fields shuffled, defaults written out explicitly, protobufjs from Node, fields this
version does not know. A producer that is not our encoder must never get an ack for a
message that is then dropped as "corrupt" (what happened to fields out of order)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from chatlib import codec, wire
from chatlib.proto.chat import v1 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reference_protobuf import field_by_field, key, official, plain, protobufjs

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
texts = st.text(max_size=30)
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
chat_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": texts, "room": texts, "dm_peer": texts, "sender": texts,
        "content": st.text(max_size=200), "ts_ms": int64s, "client_id": texts,
    },
)  # fmt: skip


@SETTINGS
@given(fields=chat_fields, seed=st.integers(), explicit=st.booleans())
def test_a_chat_message_with_fields_in_any_order_decodes_to_what_google_reads(
    fields: dict[str, Any], seed: int, explicit: bool
) -> None:
    reference = official().ChatMessage(**fields)
    data = field_by_field(reference, random.Random(seed), explicit)
    decoded = codec.decode_as(pb.ChatMessage, data)
    parsed = official().ChatMessage.FromString(data)
    assert plain(decoded) == plain(parsed) == plain(reference)
    # Re-encoding gives the canonical bytes, Google's deterministic serialization.
    assert codec.encode(decoded)[0] == reference.SerializeToString(deterministic=True)
    if data != codec.encode(decoded)[0]:
        # The hand-written fast path refuses it (it reads canonical bytes only) ...
        assert wire.parse_chat_message(data) is None


@SETTINGS
@given(messages=st.lists(chat_fields, max_size=4), has_more=st.booleans(), seed=st.integers())
def test_a_history_page_with_shuffled_messages_and_fields_decodes(
    messages: list[dict[str, Any]], has_more: bool, seed: int
) -> None:
    rnd = random.Random(seed)
    ref = official()
    page = ref.HistoryPage(messages=[ref.ChatMessage(**m) for m in messages], has_more=has_more)
    # Each nested message shuffled too, written by hand as field 1 (length-delimited).
    parts = [
        key(1, 2) + bytes(_varint(len(body))) + body
        for body in (field_by_field(m, rnd, rnd.random() < 0.5) for m in page.messages)
    ]
    if has_more:
        parts.append(key(2, 0) + b"\x01")
    data = b"".join(parts)
    assert plain(codec.decode_as(pb.HistoryPage, data)) == plain(ref.HistoryPage.FromString(data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_a_history_request_with_fields_out_of_order_decodes() -> None:
    ref = official().HistoryRequest(room="lobby", requester="alice", before_id="m1", limit=20)
    data = field_by_field(ref, random.Random(7), explicit_defaults=True)
    assert data != ref.SerializeToString()
    request = codec.decode_as(pb.HistoryRequest, data)
    assert (request.room, request.requester, request.before_id, request.limit) == (
        "lobby", "alice", "m1", 20,
    )  # fmt: skip


def test_a_repeated_scalar_field_is_last_one_wins_like_every_protobuf_parser() -> None:
    data = key(2, 2) + b"\x03dev" + key(5, 2) + b"\x01a" + key(2, 2) + b"\x05lobby"
    assert codec.decode_as(pb.ChatMessage, data).room == "lobby"
    assert official().ChatMessage.FromString(data).room == "lobby"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (key(2, 2) + b"\x05lob", "runs past the end"),  # a string cut short
        (key(6, 2) + b"\x01a", "wire type 2"),  # ts_ms (varint) sent as bytes
        (key(2, 0) + b"\x01", "wire type 0"),  # room (string) sent as a varint
        (key(2, 2) + b"\x02\xff\xfe", "not UTF-8"),
        (key(6, 0) + b"\xff" * 11, "overlong varint"),
        (key(2, 3), "wire type 3"),  # a group (proto2 only)
        (b"\x00\x00", "field number 0"),
    ],
)
def test_what_is_not_a_valid_encoding_is_refused_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(codec.DecodeError, match=why):
        codec.decode_as(pb.ChatMessage, data)


def test_protobufjs_with_fields_out_of_order_decodes_to_the_same_message() -> None:
    later = {"content": "from node", "ts_ms": 1_700_000_000_123}
    first = {"id": "01J0", "room": "lobby", "sender": "alice"}
    data = bytes.fromhex(protobufjs("encode", "chat.v1.ChatMessage", json.dumps([later, first])))
    expected = pb.ChatMessage(**first, **later)
    assert data != codec.encode(expected)[0]  # not our canonical bytes
    assert codec.decode_as(pb.ChatMessage, data) == expected


def test_protobufjs_reads_our_history_page_as_the_documented_json() -> None:
    """keepCase + longs: Number (README, "Observing the system") give the JSON names and
    plain numbers a JavaScript client expects."""
    message = pb.ChatMessage(
        id="01J0", room="lobby", sender="alice", content="hi", ts_ms=1_700_000_000_123
    )
    data, _ = codec.encode(pb.HistoryPage(messages=[message], has_more=True))
    page = json.loads(protobufjs("decode", "chat.v1.HistoryPage", data.hex()))
    assert page["has_more"] is True
    first = page["messages"][0]
    assert (first["room"], first["dm_peer"], first["ts_ms"]) == ("lobby", "", 1_700_000_000_123)
