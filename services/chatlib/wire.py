"""Hand-written protobuf for the hot paths, byte-for-byte what betterproto2 writes and
reads, at a fraction of its cost (it is pure Python and spends ~50 us per message either
way, which capped an archive replica at ~10,000 tasks/s, made a 50-message history page
cost ~2.5 ms to encode, and was a fifth of the gateway's time per durable send).

- `parse_chat_message` / `parse_archive_task`: read a task's ChatMessage. They accept only
  the canonical encoding (fields in order, each once, no default values, minimal varints,
  valid UTF-8, no unknown fields) and return None for anything else, so the caller falls
  back to chatlib.codec: the fast path never accepts what the codec would refuse, and
  gives the same values for what it accepts.
- `encode_message` / `encode_chat_message`: a ChatMessage (codec.encode uses it).
- `encode_page`: a pb.HistoryPage straight from database records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

# Field keys: (number << 3) | wire type. Wire type 2 = length-delimited, 0 = varint.
# 0x72: reply_to (field 14).
_STRING_KEYS = {0x0A: 0, 0x12: 1, 0x1A: 2, 0x22: 3, 0x2A: 4, 0x3A: 6, 0x72: 7}  # -> index
_TS_KEY = 0x30  # ChatMessage.ts_ms (field 6, varint)
_MESSAGES_KEY = b"\x0a"  # HistoryPage.messages / ArchiveTask.message (field 1, bytes)
_HAS_MORE = b"\x10\x01"  # HistoryPage.has_more = true (field 2, varint)
_STATES_KEY = b"\x1a"  # HistoryPage.states (field 3, bytes)


class Fields(NamedTuple):
    """A ChatMessage's fields, proto3 defaults for the absent ones."""

    id: str
    room: str
    dm_peer: str
    sender: str
    content: str
    ts_ms: int
    client_id: str
    reply_to: str = ""


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(value, next position) of a minimally encoded varint, else None."""
    value = shift = 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            # A trailing zero byte (other than a lone 0) is a non-minimal encoding.
            if byte == 0 and shift:
                return None
            return value, pos
        shift += 7
    return None


def _read_text(data: bytes, pos: int, end: int) -> tuple[str, int] | None:
    """(text, next position) of a non-empty UTF-8 length-delimited field, else None (an
    empty one is not canonical: proto3 leaves empty strings out)."""
    read = _read_varint(data, pos, end)
    if read is None:
        return None
    length, pos = read
    if length == 0 or pos + length > end:
        return None
    try:
        return data[pos : pos + length].decode(), pos + length
    except UnicodeDecodeError:
        return None


def parse_chat_message(data: bytes, pos: int = 0, end: int | None = None) -> Fields | None:
    """The fields of a canonically encoded ChatMessage in data[pos:end], or None."""
    end = len(data) if end is None else end
    values: list[Any] = ["", "", "", "", "", 0, "", ""]
    last_key = 0
    while pos < end:
        key = data[pos]
        pos += 1
        if key <= last_key:  # out of order, repeated, or a multi-byte key
            return None
        last_key = key
        index = _STRING_KEYS.get(key)
        if index is not None:
            read = _read_varint(data, pos, end)
            if read is None:
                return None
            length, pos = read
            if length == 0 or pos + length > end:  # an empty string is never written
                return None
            try:
                values[index] = data[pos : pos + length].decode()
            except UnicodeDecodeError:
                return None
            pos += length
        elif key == _TS_KEY:
            read = _read_varint(data, pos, end)
            if read is None or read[0] == 0 or read[0] >= 1 << 64:
                return None
            value, pos = read
            values[5] = value - (1 << 64) if value >= 1 << 63 else value  # int64
        else:
            return None  # unknown field or wrong wire type: let the codec judge
    return Fields(*values)


def parse_archive_task(data: bytes) -> Fields | None:
    """The message of a canonically encoded ArchiveTask holding one, or None."""
    if len(data) < 2 or data[0] != 0x0A:
        return None
    read = _read_varint(data, 1, len(data))
    if read is None:
        return None
    length, pos = read
    if length == 0 or pos + length != len(data):
        return None
    return parse_chat_message(data, pos, len(data))


# The one-byte varints (lengths of short strings: most fields), made once.
_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(key: bytes, text: str) -> bytes:
    raw = text.encode()
    n = len(raw)
    return key + (_ONE_BYTE[n] if n < 0x80 else _varint(n)) + raw


def encode_message(
    id: str,
    room: str,
    dm_peer: str,
    sender: str,
    content: str,
    ts_ms: int,
    client_id: str = "",
    reply_to: str = "",
) -> bytes:
    """A ChatMessage from its fields (proto3: fields at their default are not written)."""
    parts = []
    if id:
        parts.append(_string(b"\x0a", id))
    if room:
        parts.append(_string(b"\x12", room))
    if dm_peer:
        parts.append(_string(b"\x1a", dm_peer))
    if sender:
        parts.append(_string(b"\x22", sender))
    if content:
        parts.append(_string(b"\x2a", content))
    if ts_ms:
        parts.append(b"\x30" + _varint(ts_ms if ts_ms > 0 else ts_ms + (1 << 64)))
    if client_id:
        parts.append(_string(b"\x3a", client_id))
    if reply_to:
        parts.append(_string(b"\x72", reply_to))
    return b"".join(parts)


def encode_chat_message(m: Any) -> bytes:
    """`bytes(m)` for a pb.ChatMessage, without betterproto2's per-field machinery."""
    return encode_message(
        m.id, m.room, m.dm_peer, m.sender, m.content, m.ts_ms, m.client_id, m.reply_to
    )


def encode_page(messages: Sequence[bytes], has_more: bool, states: Sequence[bytes] = ()) -> bytes:
    """A HistoryPage of already encoded ChatMessages (and encoded MessageStates)."""
    parts = [_MESSAGES_KEY + _varint(len(m)) + m for m in messages]
    if has_more:
        parts.append(_HAS_MORE)
    parts.extend(_STATES_KEY + _varint(len(s)) + s for s in states)
    return b"".join(parts)


def encode_search_page(hits: Sequence[tuple[bytes, str]], has_more: bool) -> bytes:
    """A pb.SearchPage of (encoded ChatMessage, snippet) hits (issue 14)."""
    parts = []
    for message, snippet in hits:
        hit = _MESSAGES_KEY + _varint(len(message)) + message
        if snippet:
            hit += _string(b"\x12", snippet)
        parts.append(_MESSAGES_KEY + _varint(len(hit)) + hit)
    if has_more:
        parts.append(_HAS_MORE)
    return b"".join(parts)
