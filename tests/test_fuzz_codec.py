"""Fuzzing the protobuf decode path every consumer goes through: arbitrary bytes (and
arbitrary type headers) give a message or a DecodeError, never another exception; what
decodes, Google's protobuf parser reads the same from the same bytes."""

from __future__ import annotations

from chatlib import codec, names
from chatlib.proto.chat import v1 as pb
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.reference_protobuf import official, plain

TYPE_NAMES = sorted(codec.TYPES)
headers_strategy = st.one_of(
    st.none(),
    st.just({}),
    st.builds(lambda t: {names.HEADER_TYPE: t}, st.sampled_from(TYPE_NAMES)),
    st.builds(lambda t: {names.HEADER_TYPE: t}, st.text(max_size=40)),
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=512), headers=headers_strategy)
@example(data=b"\x08\x00\x00\x00", headers={names.HEADER_TYPE: "chat.v1.ChatMessage"})
@example(data=b"", headers={names.HEADER_TYPE: "chat.v1.StreamRequest"})  # optional, unset
def test_decode_of_arbitrary_bytes_returns_a_message_or_raises_decode_error(
    data: bytes, headers: dict[str, str] | None
) -> None:
    try:
        message = codec.decode(data, headers)
    except codec.DecodeError:
        return
    # What decodes is what another implementation reads from the same bytes.
    reference = getattr(official(), type(message).__name__).FromString(data)
    assert plain(message) == plain(reference)


@FUZZ
@given(data=st.binary(max_size=512), cls=st.sampled_from([codec.TYPES[t] for t in TYPE_NAMES]))
@example(data=b"\x0a\x02\x08\x00", cls=pb.ArchiveTask)
def test_decode_as_each_type_only_raises_decode_error(data: bytes, cls: type) -> None:
    try:
        codec.decode_as(cls, data)
    except codec.DecodeError:
        pass


@FUZZ
@given(
    message=st.builds(
        pb.ChatMessage,
        id=st.text(max_size=30),
        room=st.text(max_size=40),
        sender=st.text(max_size=40),
        content=st.text(max_size=200),
        ts_ms=st.integers(min_value=-(2**63), max_value=2**63 - 1),
        client_id=st.text(max_size=64),
    ),
    cut=st.integers(min_value=1, max_value=40),
)
def test_a_truncated_chat_message_is_a_decode_error_never_a_shortened_message(
    message: pb.ChatMessage, cut: int
) -> None:
    data, headers = codec.encode(message)
    assert codec.decode_as(pb.ChatMessage, data, headers) == message
    if len(data) == 0:
        return
    truncated = data[: max(0, len(data) - cut)]
    try:
        decoded = codec.decode_as(pb.ChatMessage, truncated, headers)
    except codec.DecodeError:
        return
    # A cut exactly at a field boundary is a valid (shorter) message; it must then be
    # the message those bytes really encode, not a silently corrupted one.
    assert bytes(decoded) == truncated
