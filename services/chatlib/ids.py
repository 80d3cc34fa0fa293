"""Message ids that sort by time: 48-bit milliseconds + 80 random bits, Crockford base32.

Same layout as a ULID (26 characters), monotonic within one process so two ids made in
the same millisecond still sort in creation order.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(now_ms: int | None = None) -> str:
    global _last_ms, _last_rand
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    with _lock:
        if ms <= _last_ms:
            # Same (or an earlier, after a clock step) millisecond: bump the random part
            # so the id still sorts after the previous one.
            ms = _last_ms
            rand = _last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big")
        _last_ms, _last_rand = ms, rand
    return _encode(ms, 10) + _encode(rand & ((1 << 80) - 1), 16)


def id_time_ms(message_id: str) -> int:
    """The millisecond timestamp an id was made at; ValueError for a malformed id."""
    if len(message_id) != 26:
        raise ValueError("message id must be 26 characters")
    value = 0
    for ch in message_id[:10]:
        idx = _ALPHABET.find(ch)
        if idx < 0:
            raise ValueError(f"bad character {ch!r} in message id")
        value = value * 32 + idx
    return value


def is_valid_id(message_id: str) -> bool:
    if len(message_id) != 26:
        return False
    return all(ch in _ALPHABET for ch in message_id)
