"""nats-py's header parsing at C speed, for a connection that receives many messages.

nats-py parses every received message's headers in Python (`Client._parse_header_lines`)
and checks each header name for whitespace one character at a time with a generator: a
sixth of an archive replica's time while draining. `parse_header_lines` gives the same
dict for every input (`tests/test_nats_headers.py` checks it against nats-py's with
hypothesis); `use_on(nc)` makes one connection use it, leaving every other untouched.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """`Name: Value` lines (CRLF-separated) -> dict, as nats-py's _parse_header_lines."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue  # nats-py drops a name with non-ASCII bytes
        # A name holding whitespace is dropped. str.split() splits on exactly the
        # characters str.isspace() accepts, so [key] means none (one C call per name).
        if key and key.split() != [key]:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def use_on(nc: NATS) -> None:
    """Parse this connection's received headers with parse_header_lines. An instance
    attribute shadows nats-py's static method, which it calls through `self`."""
    nc._parse_header_lines = parse_header_lines  # type: ignore[method-assign]
