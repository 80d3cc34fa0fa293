"""The one protobuf codec: every NATS payload is protobuf with a header naming its type.

Bad bytes become `DecodeError`, never a raw exception deep inside a handler.
"""

from __future__ import annotations

from typing import TypeVar

import betterproto2

from chatlib import names, wire
from chatlib.proto.chat import v1 as pb

M = TypeVar("M", bound=betterproto2.Message)


class DecodeError(Exception):
    """A NATS payload that is not the protobuf message it claims (or is expected) to be."""


def _full_name(cls: type[betterproto2.Message]) -> str:
    return f"chat.v1.{cls.__name__}"


# Every message type of chat.v1, by its full protobuf name.
TYPES: dict[str, type[betterproto2.Message]] = {
    _full_name(getattr(pb, name)): getattr(pb, name) for name in pb.__all__
}


def type_name(message: betterproto2.Message) -> str:
    return _full_name(type(message))


def encode(message: betterproto2.Message) -> tuple[bytes, dict[str, str]]:
    """Payload bytes and the headers that name the payload's type."""
    # ChatMessage is on every send's path: wire writes the same bytes much faster. It
    # knows only today's fields, so a message carrying a newer producer's fields (kept as
    # unknown fields) goes through betterproto2, which writes them back out.
    if type(message) is pb.ChatMessage and not message._unknown_fields:
        data = wire.encode_chat_message(message)
    else:
        data = bytes(message)
    return data, {names.HEADER_TYPE: type_name(message)}


def decode_as(cls: type[M], data: bytes, headers: dict[str, str] | None = None) -> M:
    """Decode `data` as `cls`; a header naming another type is an error too."""
    declared = (headers or {}).get(names.HEADER_TYPE)
    if declared is not None and declared != _full_name(cls):
        raise DecodeError(f"expected {_full_name(cls)}, header says {declared}")
    # betterproto2's parser is lenient (a truncated string comes back shortened, garbage
    # comes back as unknown fields, a field of the wrong wire type is stored as whatever
    # it decoded to). Unknown fields are kept and re-encoded, and every protobuf encoder
    # writes fields in order, so a real message re-encodes to its own bytes; anything
    # else is corrupt. Re-encoding can itself fail on a wrongly typed field.
    try:
        message = cls.parse(data)
        canonical = bytes(message) == data
    except Exception as exc:  # betterproto2 raises assorted errors on bad wire data
        raise DecodeError(f"cannot decode {_full_name(cls)}: {exc}") from exc
    if not canonical or (message._unknown_fields and not _well_formed(data)):
        raise DecodeError(f"corrupt or truncated {_full_name(cls)} payload")
    return message


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("bad varint")


def _well_formed(data: bytes) -> bool:
    """True when `data` is a sequence of valid protobuf fields. Garbage that betterproto2
    kept as 'unknown fields' fails here (bad wire types, field 0, overlong lengths)."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            field, wire = key >> 3, key & 7
            if field == 0:
                return False
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 2:
                length, pos = _varint(data, pos)
                pos += length
            elif wire == 5:
                pos += 4
            else:  # groups (3, 4) are not used by proto3; 6 and 7 do not exist
                return False
            if pos > len(data):
                return False
    except ValueError:
        return False
    return True


def decode(data: bytes, headers: dict[str, str] | None) -> betterproto2.Message:
    """Decode a payload whose type is named by its header."""
    declared = (headers or {}).get(names.HEADER_TYPE)
    if declared is None:
        raise DecodeError(f"missing {names.HEADER_TYPE} header")
    cls = TYPES.get(declared)
    if cls is None:
        raise DecodeError(f"unknown payload type {declared!r}")
    return decode_as(cls, data, headers)
