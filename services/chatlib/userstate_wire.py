"""Hand-written protobuf for the user state a hello asks for (chat.v1.UserState): a user
in 200 rooms is 200 ThreadStates, which betterproto2 takes ~20 ms to encode and as long
to decode (see chatlib.wire for the same reasoning on messages).

- `encode_user_state`: byte for byte what `bytes(pb.UserState(...))` writes.
- `parse_user_state`: reads the canonical encoding (fields in order, each at most once
  except the repeated ones, no defaults written, minimal varints) into plain tuples with
  the same attribute names; None for anything else, so the caller falls back to the codec.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from chatlib.wire import _read_text, _read_varint, _string, _varint


class Thread(NamedTuple):
    """A ThreadState's fields, proto3 defaults for the absent ones."""

    room: str = ""
    dm_peer: str = ""
    unread: int = 0
    mentions: int = 0
    read_seq: int = 0
    last_seq: int = 0
    last_ts_ms: int = 0
    read_id: str = ""


class State(NamedTuple):
    rooms: list[str]
    threads: list[Thread]
    archived_through: int = 0
    first_use: bool = False


def _int(key: int, value: int) -> bytes:
    return bytes((key,)) + _varint(value if value >= 0 else value + (1 << 64))


def encode_thread(t: Any) -> bytes:
    parts = []
    if t.room:
        parts.append(_string(b"\x0a", t.room))
    if t.dm_peer:
        parts.append(_string(b"\x12", t.dm_peer))
    for key, value in (
        (0x18, t.unread),
        (0x20, t.mentions),
        (0x28, t.read_seq),
        (0x30, t.last_seq),
        (0x38, t.last_ts_ms),
    ):
        if value:
            parts.append(_int(key, value))
    if t.read_id:
        parts.append(_string(b"\x42", t.read_id))
    return b"".join(parts)


def encode_user_state(
    rooms: Sequence[str], threads: Sequence[Any], archived_through: int, first_use: bool
) -> bytes:
    parts = [_string(b"\x0a", room) for room in rooms]
    for t in threads:
        body = encode_thread(t)
        parts.append(b"\x12" + _varint(len(body)) + body)
    if archived_through:
        parts.append(_int(0x18, archived_through))
    if first_use:
        parts.append(b"\x20\x01")
    return b"".join(parts)


_THREAD_STRINGS = {0x0A: 0, 0x12: 1, 0x42: 7}
_THREAD_INTS = {0x18: 2, 0x20: 3, 0x28: 4, 0x30: 5, 0x38: 6}
_UINT32_MAX = (1 << 32) - 1


def _parse_thread(data: bytes, pos: int, end: int) -> Thread | None:
    values: list[Any] = ["", "", 0, 0, 0, 0, 0, ""]
    last_key = 0
    while pos < end:
        key = data[pos]
        pos += 1
        if key <= last_key:
            return None
        last_key = key
        if key in _THREAD_STRINGS:
            text = _read_text(data, pos, end)
            if text is None:
                return None
            values[_THREAD_STRINGS[key]], pos = text
        elif key in _THREAD_INTS:
            read = _read_varint(data, pos, end)
            if read is None or read[0] == 0:
                return None
            value, pos = read
            index = _THREAD_INTS[key]
            if index in (2, 3) and value > _UINT32_MAX:
                return None
            if index == 6 and value >= 1 << 63:
                value -= 1 << 64
            values[index] = value
        else:
            return None
    return Thread(*values)


def parse_user_state(data: bytes) -> State | None:
    rooms: list[str] = []
    threads: list[Thread] = []
    archived_through = 0
    first_use = False
    pos, end, last_key = 0, len(data), 0
    while pos < end:
        key = data[pos]
        pos += 1
        # Repeated fields come as a run of the same key; others once, in order.
        if key < last_key or (key == last_key and key not in (0x0A, 0x12)):
            return None
        last_key = key
        if key in (0x0A, 0x12):
            read = _read_varint(data, pos, end)
            if read is None:
                return None
            length, pos = read
            if pos + length > end:
                return None
            if key == 0x0A:
                if length == 0:
                    return None
                try:
                    rooms.append(data[pos : pos + length].decode())
                except UnicodeDecodeError:
                    return None
            else:
                thread = _parse_thread(data, pos, pos + length)
                if thread is None:
                    return None
                threads.append(thread)
            pos += length
        elif key == 0x18:
            read = _read_varint(data, pos, end)
            if read is None or read[0] == 0:
                return None
            archived_through, pos = read
        elif key == 0x20:
            if pos >= end or data[pos] != 1:
                return None
            first_use = True
            pos += 1
        else:
            return None
    return State(rooms, threads, archived_through, first_use)
