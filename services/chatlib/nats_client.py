"""The NATS client every service connects with: nats-py's, with a cheaper header reader.

Every chat message a gateway fans out arrives with about ten headers (ours plus the
Nats-Stream/-Subject/-Sequence/-Time-Stamp/-Last-Sequence JetStream adds on republish).
nats-py 2.16 reads each header name through `any(c.isspace() for c in key)`, a generator
step per character: about a tenth of a gateway's CPU under durable sends (issue 18,
py-spy). Header names repeat (a handful of distinct ones), so here each distinct name is
checked once and remembered; the result is nats-py's own, to the byte
(tests/test_nats_client.py compares both on every kind of input). The fix belongs in
nats-py; when it is there, this module goes.
"""

from __future__ import annotations

import re

from nats.aio.client import Client as _LibraryClient

# What str.isspace() calls whitespace (re's \s on str is the same set).
_WHITESPACE = re.compile(r"\s")
# Names seen so far -> the key they read as (None: a name nats-py skips). Bounded: a
# peer sending endless distinct names only makes the cache stop growing.
_KEYS: dict[bytes, str | None] = {}
_KEYS_MAX = 1024
_UNSEEN = object()


def _key_of(name: bytes) -> str | None:
    """The header key a name line reads as, by nats-py's rules; None when it skips it."""
    try:
        key = name.strip().decode("ascii")
    except UnicodeDecodeError:
        return None  # a non-ASCII name cannot be looked up anyway
    if _WHITESPACE.search(key):
        return None  # header names are tokens: no whitespace inside
    return key


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """`nats.aio.client.Client._parse_header_lines`, with each name checked once."""
    out: dict[str, str] = {}
    keys = _KEYS
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = keys.get(name, _UNSEEN)
        if key is _UNSEEN:
            key = _key_of(name)
            if len(keys) < _KEYS_MAX:
                keys[name] = key
        if key is None:
            continue
        out[key] = value.strip().decode("utf-8", "replace")  # type: ignore[index]
    return out


class Client(_LibraryClient):
    """nats-py's client with `parse_header_lines` as its header reader."""

    _parse_header_lines = staticmethod(parse_header_lines)
