"""The one protobuf codec: every NATS payload is protobuf with a header naming its type.

Bad bytes become `DecodeError`, never a raw exception deep inside a handler.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

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


def type_name_of(cls: type[betterproto2.Message]) -> str:
    """The header value naming payloads of type `cls`."""
    return _full_name(cls)


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
    """Decode `data` as `cls`; a header naming another type is an error too.

    Every valid encoding is accepted, whoever wrote it: fields in any order, repeated
    scalars (last one wins), default values written out, packed or unpacked repeated
    fields, fields this version does not know (kept, and written back on re-encode).
    """
    declared = (headers or {}).get(names.HEADER_TYPE)
    if declared is not None and declared != _full_name(cls):
        raise DecodeError(f"expected {_full_name(cls)}, header says {declared}")
    # betterproto2's parser is lenient (a truncated string comes back shortened, garbage
    # comes back as unknown fields, a field of the wrong wire type is stored as whatever
    # it decoded to), so the bytes are first checked against the schema.
    problem = _schema_problem(cls, data)
    if problem is not None:
        raise DecodeError(f"corrupt or truncated {_full_name(cls)} payload: {problem}")
    try:
        return cls.parse(data)
    except Exception as exc:  # betterproto2 raises assorted errors on bad wire data
        raise DecodeError(f"cannot decode {_full_name(cls)}: {exc}") from exc


# Wire types: 0 varint, 1 fixed 64-bit, 2 length-delimited, 5 fixed 32-bit. Groups (3, 4)
# do not exist in proto3; 6 and 7 do not exist at all.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_WIRE_OF_TYPE = {
    **dict.fromkeys(
        ("int32", "int64", "uint32", "uint64", "sint32", "sint64", "bool", "enum"), _VARINT
    ),
    **dict.fromkeys(("fixed64", "sfixed64", "double"), _I64),
    **dict.fromkeys(("fixed32", "sfixed32", "float"), _I32),
    **dict.fromkeys(("string", "bytes", "message", "map"), _LEN),
}
_MAX_VARINT_BYTES = 10


def _read_varint(data: bytes, pos: int, end: int) -> int:
    """Position after the varint at `pos`; ValueError when it is cut off or too long."""
    for i in range(pos, min(end, pos + _MAX_VARINT_BYTES)):
        if data[i] < 0x80:
            return i + 1
    raise ValueError("truncated or overlong varint")


def _varint_value(data: bytes, pos: int, end: int) -> tuple[int, int]:
    after = _read_varint(data, pos, end)
    value = 0
    for shift, byte in enumerate(data[pos:after]):
        value |= (byte & 0x7F) << (7 * shift)
    return value, after


def _schema_problem(cls: type[betterproto2.Message], data: bytes) -> str | None:
    """Why `data` is not a valid protobuf encoding of `cls`, or None when it is."""
    try:
        return _check(cls, data, 0, len(data))
    except ValueError as exc:
        return str(exc)


def _check(cls: type[betterproto2.Message], data: bytes, pos: int, end: int) -> str | None:
    meta: Any = cast(Any, cls)._betterproto  # betterproto2's per-class schema
    while pos < end:
        key, pos = _varint_value(data, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0 or number >= 1 << 29:
            return f"field number {number}"
        if wire_type == _VARINT:
            value_start, pos = pos, _read_varint(data, pos, end)
        elif wire_type == _I64:
            value_start, pos = pos, pos + 8
        elif wire_type == _I32:
            value_start, pos = pos, pos + 4
        elif wire_type == _LEN:
            length, value_start = _varint_value(data, pos, end)
            pos = value_start + length
        else:
            return f"wire type {wire_type} (field {number})"
        if pos > end:
            return f"field {number} runs past the end"
        name = meta.field_name_by_number.get(number)
        if name is None:
            continue  # a newer producer's field: kept as an unknown field
        problem = _check_field(meta, name, wire_type, data, value_start, pos)
        if problem is not None:
            return problem
    return None


def _check_field(
    meta: Any, name: str, wire_type: int, data: bytes, start: int, end: int
) -> str | None:
    field = meta.meta_by_field_name[name]
    expected = _WIRE_OF_TYPE[field.proto_type]
    if field.repeated and wire_type == _LEN and expected != _LEN:
        return _check_packed(data, start, end, expected)  # packed repeated scalars
    if wire_type != expected:
        return f"field {name} has wire type {wire_type}, not {expected}"
    if field.proto_type == "string":
        try:
            data[start:end].decode()
        except UnicodeDecodeError:
            return f"field {name} is not UTF-8"
    elif field.proto_type == "message":
        return _check(meta.cls_by_field[name], data, start, end)
    return None


def _check_packed(data: bytes, pos: int, end: int, wire_type: int) -> str | None:
    if wire_type == _VARINT:
        while pos < end:
            pos = _read_varint(data, pos, end)
        return None
    width = 8 if wire_type == _I64 else 4
    return None if (end - pos) % width == 0 else "packed field of the wrong length"


def decode(data: bytes, headers: dict[str, str] | None) -> betterproto2.Message:
    """Decode a payload whose type is named by its header."""
    declared = (headers or {}).get(names.HEADER_TYPE)
    if declared is None:
        raise DecodeError(f"missing {names.HEADER_TYPE} header")
    cls = TYPES.get(declared)
    if cls is None:
        raise DecodeError(f"unknown payload type {declared!r}")
    return decode_as(cls, data, headers)
