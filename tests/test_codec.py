"""Bad bytes on NATS become the project's DecodeError, never a crash deep in a handler."""

from __future__ import annotations

import pytest
from chatlib import codec
from chatlib.proto.chat import v1 as pb


def test_undecodable_bytes_raise_decode_error() -> None:
    _, headers = codec.encode(pb.ChatMessage())
    with pytest.raises(codec.DecodeError):
        codec.decode(b"\xff\xff\xff\xff", headers)


def test_a_payload_without_a_type_header_is_refused() -> None:
    with pytest.raises(codec.DecodeError, match="missing Chat-Type"):
        codec.decode(bytes(pb.ChatMessage(id="x")), {})


def test_an_unknown_type_header_is_refused() -> None:
    with pytest.raises(codec.DecodeError, match="unknown payload type"):
        codec.decode(b"", {"Chat-Type": "chat.v1.Nope"})


def test_a_header_naming_another_type_than_expected_is_refused() -> None:
    data, headers = codec.encode(pb.UserOnline(user="alice"))
    with pytest.raises(codec.DecodeError, match="expected chat.v1.ChatMessage"):
        codec.decode_as(pb.ChatMessage, data, headers)


def test_garbage_that_the_parser_would_keep_as_unknown_fields_is_refused() -> None:
    with pytest.raises(codec.DecodeError, match="corrupt"):
        codec.decode(b"\xff\xfe garbage", {"Chat-Type": "chat.v1.ArchiveTask"})


def test_fields_from_a_newer_producer_are_kept_not_refused() -> None:
    newer = bytes(pb.ChatMessage(id="ab", ts_ms=5)) + b"\x40\x01"  # field 8, varint 1
    assert codec.decode_as(pb.ChatMessage, newer).id == "ab"


def test_re_encoding_keeps_a_newer_producers_fields() -> None:
    newer = bytes(pb.ChatMessage(id="ab", ts_ms=5)) + b"\x40\x01"  # field 8, varint 1
    message = codec.decode_as(pb.ChatMessage, newer)
    assert codec.encode(message)[0] == newer
