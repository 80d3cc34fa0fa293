"""The live path's ChatMessage decode (chatlib.message_events.decode_chat): its fast path
(chatlib.wire) must give exactly what the codec gives, and leave everything it does not
read canonically to the codec, which judges it as before."""

from __future__ import annotations

import pytest
from chatlib import codec, message_events
from chatlib.proto.chat import v1 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.chat_strategies import chat_messages

messages = chat_messages(with_reply_to=True)


@settings(max_examples=300, deadline=None)
@given(messages, st.booleans())
def test_decode_chat_reads_every_message_as_the_codec_does(
    message: pb.ChatMessage, typed: bool
) -> None:
    data, headers = codec.encode(message)
    got = message_events.decode_chat(data, headers if typed else None)
    assert isinstance(got, pb.ChatMessage)
    assert got == codec.decode_as(pb.ChatMessage, data, headers) == message


def test_a_non_canonical_message_still_goes_through_the_codec() -> None:
    # ts_ms (field 6) before id (field 1): valid protobuf, not what our producers write.
    data = b"\x30\x05\x0a\x01a"
    assert message_events.decode_chat(data, None) == pb.ChatMessage(id="a", ts_ms=5)
    # A truncated string is refused, as the codec refuses it.
    with pytest.raises(codec.DecodeError):
        message_events.decode_chat(b"\x0a\x05ab", None)


def test_another_type_on_a_chat_subject_is_not_read_as_a_message() -> None:
    edit = pb.MessageEdit(room="r", message_id="m", content="new")
    data, headers = codec.encode(edit)
    assert message_events.decode_chat(data, headers) == edit
