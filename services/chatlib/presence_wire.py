"""Hand-written protobuf for the presence heartbeat (chat.v1.Heartbeat), which lists every
live connection of a gateway every 2 s: at 10,000 sockets betterproto2 took ~5% of the
gateway's time to write it and a third of presence's time to check and read it (see
chatlib.wire for the same reasoning on messages).

- `encode_connection` once per connection (when it opens), then `encode_heartbeat` joins
  the stored pieces: byte for byte what `bytes(pb.Heartbeat(...))` writes.
- `encode_connection_event` / `parse_connection_event`: a ConnectionOpened /
  ConnectionClosed (same layout), one of each per socket.
- `encode_user_event` / `parse_user_event`: a UserOnline / UserOffline (same layout),
  which presence writes and every gateway reads once per transition.
- `parse_heartbeat`: reads the canonical encoding (fields in order, connections as one
  run, no defaults written, minimal varints, valid UTF-8) into plain tuples with the same
  attribute names; None for anything else, so the caller falls back to the codec.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from chatlib.wire import _read_text, _read_varint, _string, _varint

_GATEWAY_KEY = b"\x0a"  # Heartbeat.gateway_id (field 1, bytes)
_CONNECTION_KEY = b"\x12"  # Heartbeat.connections (field 2, bytes)
_TS_KEY = 0x18  # Heartbeat.ts_ms (field 3, varint)


class Connection(NamedTuple):
    connection_id: str = ""
    user: str = ""


class Heartbeat(NamedTuple):
    gateway_id: str
    connections: list[Connection]
    ts_ms: int = 0


def encode_connection(connection_id: str, user: str) -> bytes:
    """One entry of Heartbeat.connections, key and length included."""
    body = b""
    if connection_id:
        body += _string(b"\x0a", connection_id)
    if user:
        body += _string(b"\x12", user)
    return _CONNECTION_KEY + _varint(len(body)) + body


def encode_connection_event(gateway_id: str, connection_id: str, user: str, ts_ms: int) -> bytes:
    """A ConnectionOpened or ConnectionClosed (same fields): byte for byte what
    betterproto2 writes, without its per-field walk (one of each per socket)."""
    out = _string(b"\x0a", gateway_id) if gateway_id else b""
    if connection_id:
        out += _string(b"\x12", connection_id)
    if user:
        out += _string(b"\x1a", user)
    if ts_ms:
        out += b"\x20" + _varint(ts_ms if ts_ms >= 0 else ts_ms + (1 << 64))
    return out


def encode_user_event(user: str, ts_ms: int) -> bytes:
    """A UserOnline or UserOffline (same fields): byte for byte betterproto2's output
    (presence writes one per transition)."""
    out = _string(b"\x0a", user) if user else b""
    if ts_ms:
        out += b"\x10" + _varint(ts_ms if ts_ms >= 0 else ts_ms + (1 << 64))
    return out


def encode_heartbeat(gateway_id: str, connections: Iterable[bytes], ts_ms: int) -> bytes:
    """A Heartbeat from its gateway id, `encode_connection` pieces and time."""
    head = _string(_GATEWAY_KEY, gateway_id) if gateway_id else b""
    tail = bytes((_TS_KEY,)) + _varint(ts_ms if ts_ms >= 0 else ts_ms + (1 << 64)) if ts_ms else b""
    return head + b"".join(connections) + tail


def _parse_connection(data: bytes, pos: int, end: int) -> Connection | None:
    values = ["", ""]
    last_key = 0
    while pos < end:
        key = data[pos]
        if key not in (0x0A, 0x12) or key <= last_key:
            return None
        last_key = key
        read = _read_text(data, pos + 1, end)
        if read is None:
            return None
        values[key >> 4], pos = read  # 0x0A -> 0, 0x12 -> 1
    return Connection(*values)


def parse_heartbeat(data: bytes) -> Heartbeat | None:
    gateway_id, connections, ts_ms = "", [], 0
    pos, end, last_key = 0, len(data), 0
    while pos < end:
        key = data[pos]
        pos += 1
        # The connections come as one run of the same key; the others once, in order.
        if key < last_key or (key == last_key and key != 0x12):
            return None
        last_key = key
        if key == 0x0A:
            read = _read_text(data, pos, end)
            if read is None:
                return None
            gateway_id, pos = read
        elif key == 0x12:
            length_read = _read_varint(data, pos, end)
            if length_read is None:
                return None
            length, pos = length_read
            if pos + length > end:
                return None
            connection = _parse_connection(data, pos, pos + length)
            if connection is None:
                return None
            connections.append(connection)
            pos += length
        elif key == _TS_KEY:
            ts_read = _ts(data, pos, end)
            if ts_read is None:
                return None
            ts_ms, pos = ts_read
        else:
            return None
    return Heartbeat(gateway_id, connections, ts_ms)


class ConnectionEvent(NamedTuple):
    """A ConnectionOpened or ConnectionClosed, read by parse_connection_event."""

    gateway_id: str = ""
    connection_id: str = ""
    user: str = ""
    ts_ms: int = 0


def parse_connection_event(data: bytes) -> ConnectionEvent | None:
    """A canonically encoded ConnectionOpened / ConnectionClosed (fields in order, each
    at most once, no defaults written), else None: the codec judges it then."""
    values: list[str | int] = ["", "", "", 0]
    pos, end, last_key = 0, len(data), 0
    while pos < end:
        key = data[pos]
        if key <= last_key or key not in (0x0A, 0x12, 0x1A, 0x20):
            return None
        last_key = key
        if key == 0x20:
            read_ts = _ts(data, pos + 1, end)
            if read_ts is None:
                return None
            values[3], pos = read_ts
        else:
            read = _read_text(data, pos + 1, end)
            if read is None:
                return None
            values[(key >> 3) - 1], pos = read  # field number - 1
    return ConnectionEvent(*values)  # type: ignore[arg-type]


def _ts(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    read = _read_varint(data, pos, end)
    if read is None or read[0] == 0 or read[0] >= 1 << 64:
        return None
    value, pos = read
    return (value - (1 << 64) if value >= 1 << 63 else value), pos


def parse_user_event(data: bytes) -> tuple[str, int] | None:
    """(user, ts_ms) of a canonically encoded UserOnline / UserOffline, else None."""
    user, ts_ms = "", 0
    pos, end = 0, len(data)
    if pos < end and data[pos] == 0x0A:
        read = _read_text(data, pos + 1, end)
        if read is None:
            return None
        user, pos = read
    if pos < end and data[pos] == 0x10:
        ts_read = _ts(data, pos + 1, end)
        if ts_read is None:
            return None
        ts_ms, pos = ts_read
    return (user, ts_ms) if pos == end else None
