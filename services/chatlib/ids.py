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


# Every pair of characters, by the 10 bits they encode: an id is 13 lookups, not a loop
# of 26 steps (new_id is on every durable send's path; issue 18).
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
_MS_MASK = (1 << 50) - 1  # 10 characters of time
_RAND_MASK = (1 << 80) - 1  # 16 characters of randomness


def _encode_id(ms: int, rand: int) -> str:
    """`_encode(ms, 10) + _encode(rand, 16)`, the 130 bits ten at a time."""
    v = (ms & _MS_MASK) << 80 | (rand & _RAND_MASK)
    p = _PAIRS
    return "".join(
        (
            p[v >> 120],
            p[(v >> 110) & 1023],
            p[(v >> 100) & 1023],
            p[(v >> 90) & 1023],
            p[(v >> 80) & 1023],
            p[(v >> 70) & 1023],
            p[(v >> 60) & 1023],
            p[(v >> 50) & 1023],
            p[(v >> 40) & 1023],
            p[(v >> 30) & 1023],
            p[(v >> 20) & 1023],
            p[(v >> 10) & 1023],
            p[v & 1023],
        )
    )


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
    return _encode_id(ms, rand)


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
