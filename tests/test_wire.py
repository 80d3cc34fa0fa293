"""The hand-written protobuf of the hot paths (chatlib.wire) against betterproto2: the
same bytes out, the same values in, and never accepting a payload the codec would refuse."""

from __future__ import annotations

from archive import handlers
from chatlib import codec, ids, wire
from chatlib.proto.chat import v1 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.chat_strategies import chat_messages

messages = chat_messages()


def fields_of(message: pb.ChatMessage) -> wire.Fields:
    return wire.Fields(
        message.id,
        message.room,
        message.dm_peer,
        message.sender,
        message.content,
        message.ts_ms,
        message.client_id,
    )


@settings(max_examples=300, deadline=None)
@given(messages)
def test_fast_parse_reads_every_message_as_betterproto_does(message: pb.ChatMessage) -> None:
    assert wire.parse_chat_message(bytes(message)) == fields_of(message)
    assert wire.parse_archive_task(bytes(pb.ArchiveTask(message=message))) == (
        fields_of(message) if bytes(message) else None  # an empty message: the codec decides
    )


@settings(max_examples=300, deadline=None)
@given(messages)
def test_chat_messages_are_encoded_byte_for_byte_as_betterproto_does(
    message: pb.ChatMessage,
) -> None:
    assert wire.encode_chat_message(message) == bytes(message)
    data, headers = codec.encode(message)
    assert data == bytes(message)
    assert codec.decode_as(pb.ChatMessage, data, headers) == message


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, max_size=5), st.booleans())
def test_pages_are_encoded_byte_for_byte_as_betterproto_does(
    page: list[pb.ChatMessage], has_more: bool
) -> None:
    for m in page:
        m.client_id = ""  # the archive does not keep it
    encoded = [
        wire.encode_message(m.id, m.room, m.dm_peer, m.sender, m.content, m.ts_ms) for m in page
    ]
    assert wire.encode_page(encoded, has_more) == bytes(
        pb.HistoryPage(messages=page, has_more=has_more)
    )


def reference(cls: type[pb.ChatMessage] | type[pb.ArchiveTask], data: bytes) -> object:
    try:
        decoded = codec.decode_as(cls, data)
    except codec.DecodeError:
        return "refused"
    if isinstance(decoded, pb.ArchiveTask):
        return None if decoded.message is None else fields_of(decoded.message)
    return fields_of(decoded)


@settings(max_examples=1000, deadline=None)
@given(
    st.binary(max_size=60)
    | messages.map(bytes).flatmap(
        lambda b: st.sampled_from(
            [b, b[:-1], b + b"\x00", b"\x0a" + bytes([len(b) & 0x7F]) + b, b[1:]]
        )
    )
)
def test_fast_parse_never_accepts_what_the_codec_refuses(data: bytes) -> None:
    for parse, cls in (
        (wire.parse_chat_message, pb.ChatMessage),
        (wire.parse_archive_task, pb.ArchiveTask),
    ):
        fast = parse(data)
        if fast is not None:
            assert reference(cls, data) == fast


def test_non_canonical_encodings_go_to_the_codec() -> None:
    canonical = bytes(pb.ChatMessage(id="a", ts_ms=5))
    assert wire.parse_chat_message(canonical) == wire.Fields("a", "", "", "", "", 5, "")
    assert wire.parse_chat_message(b"\x30\x05\x0a\x01a") is None  # out of order
    assert wire.parse_chat_message(b"\x0a\x00") is None  # explicit default
    assert wire.parse_chat_message(b"\x30\x85\x00") is None  # overlong varint
    assert wire.parse_chat_message(b"\x0a\x01\xff") is None  # not UTF-8
    assert wire.parse_chat_message(b"\x48\x01") is None  # unknown field


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabc\n-", min_size=24, max_size=28))
def test_the_archive_id_check_is_chatlib_s(candidate: str) -> None:
    assert bool(handlers._ID.fullmatch(candidate)) == ids.is_valid_id(candidate)
    assert bool(handlers._ID.fullmatch(ids.new_id()))


def test_a_search_page_encodes_as_betterproto2_does() -> None:
    message = pb.ChatMessage(id="01ARZ3NDEKTSV4RRFFQ69G5FAV", room="dev", sender="a", content="x y")
    expected = pb.SearchPage(
        hits=[
            pb.SearchHit(message=message, snippet="\ue000x\ue001 y"),
            pb.SearchHit(message=message),
        ],
        has_more=True,
    )
    hits = [(bytes(message), "\ue000x\ue001 y"), (bytes(message), "")]
    assert wire.encode_search_page(hits, True) == bytes(expected)
    assert pb.SearchPage.parse(wire.encode_search_page([], False)) == pb.SearchPage()
