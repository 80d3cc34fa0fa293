"""The NATS client every service connects with: nats-py's, with a cheaper header reader;
and `publish_now`, nats-py's publish without its coroutine and per-header checks.

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

import asyncio
import logging
import re
from collections.abc import Callable

from nats import errors
from nats.aio.client import _HEADER_KEY_RE, _HEADER_VALUE_NEWLINES, _validate_subject
from nats.aio.client import Client as _LibraryClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

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


Handler = Callable[[Msg], None]


class Client(_LibraryClient):
    """nats-py's client with `parse_header_lines` as its header reader, and subscriptions
    whose messages go to a plain function as they are read (`subscribe_handler`)."""

    _parse_header_lines = staticmethod(parse_header_lines)

    def __init__(self) -> None:
        super().__init__()
        self._handlers: dict[int, Handler] = {}

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        handler = self._handlers.get(sid)
        if handler is not None:
            sub = self._subs.get(sid)
            if sub is not None:
                # What nats-py does for a plain subscription's message, up to queueing it.
                stats = self.stats
                stats["in_msgs"] += 1
                stats["in_bytes"] += len(data)
                sub._received += 1
                hdr = await self._process_headers(headers)
                msg = self._build_message(sid, subject, reply, data, hdr)
                try:
                    handler(msg)
                except Exception:  # never into the read loop: it would drop the connection
                    log.exception("handler of %s failed", msg.subject)
                return
            del self._handlers[sid]  # unsubscribed
        await super()._process_msg(sid, subject, reply, data, headers)


async def subscribe_handler(nc: _LibraryClient, subject: str, handler: Handler) -> Subscription:
    """Subscribe `handler`, a plain function, to `subject`. On our Client it is called from
    the read loop as each message is parsed: no subscription queue, no task hop, no
    coroutine per message (a PubAck and a live copy per durable send, issue 18). It is
    registered under the subscription's id before the SUB is even queued, so every
    message goes that way and the subscription's queue stays empty. On nats-py's client
    it is called from the subscription's own callback task (see queues_messages)."""

    async def forward(msg: Msg) -> None:
        handler(msg)

    if not isinstance(nc, Client):
        return await nc.subscribe(subject, cb=forward)
    sid = nc._sid + 1  # the id subscribe() gives it: nothing runs in between
    nc._handlers[sid] = handler
    try:
        sub = await nc.subscribe(subject, cb=forward)
    except BaseException:
        nc._handlers.pop(sid, None)
        raise
    assert sub._id == sid, "nats-py numbers subscriptions differently: see subscribe_handler"
    return sub


def queues_messages(nc: _LibraryClient) -> bool:
    """Whether messages of subscribe_handler's subscriptions on `nc` wait in a queue for
    a task (nats-py's client) rather than reaching the handler as they are read."""
    return not isinstance(nc, Client)


# --- publishing ----------------------------------------------------------------------------
# A durable send's publish through nats-py (`Client.publish`, `_send_publish`, `hpub_cmd`,
# `_send_command`, `_flush_pending`) was ~8% of a gateway's CPU under durable sends
# (issue 18, py-spy): a coroutine per call, the header block rebuilt with a regex check
# per name. `publish_now` writes the same bytes into the same outgoing buffer and wakes
# the same flusher, synchronously, with each distinct header name checked once.
# tests/test_nats_client.py compares its bytes, errors and stats with nats-py's.

# Header name -> its line start (b"Name: "), or None for a name nats-py skips (blank).
# Bounded like _KEYS; a name nats-py refuses is never remembered (it raises each time).
_NAME_LINES: dict[str, bytes | None] = {}
_HEADER_START = b"NATS/1.0\r\n"


def _name_line(name: str) -> bytes | None:
    line = _NAME_LINES.get(name, _UNSEEN)
    if line is _UNSEEN:
        key = name.strip()
        if not key:
            line = None
        elif not _HEADER_KEY_RE.fullmatch(key):
            raise errors.BadHeaderError(key)
        else:
            line = key.encode() + b": "
        if len(_NAME_LINES) < _KEYS_MAX:
            _NAME_LINES[name] = line
    return line  # type: ignore[return-value]


def header_block(headers: dict[str, str]) -> bytes:
    """The header block nats-py writes for `headers` (NATS/1.0, the lines, a blank line)."""
    parts = [_HEADER_START]
    names = _NAME_LINES
    for name, value in headers.items():
        line = names.get(name)
        if line is None:
            line = _name_line(name)
            if line is None:
                continue  # a blank name: nats-py skips it
        value = value.strip()
        if "\r" in value or "\n" in value:  # str.translate is slow: only when needed
            value = value.translate(_HEADER_VALUE_NEWLINES)
        parts.append(line + value.encode() + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def publish_command(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> bytes:
    """The PUB (no headers) or HPUB command nats-py's `_send_publish` queues."""
    if headers is None:
        return f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n"
    block = header_block(headers)
    size = len(block)
    head = f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode()
    return b"".join((head, block, payload, b"\r\n"))


def publish_now(
    nc: _LibraryClient,
    subject: str,
    payload: bytes,
    reply: str = "",
    headers: dict[str, str] | None = None,
) -> bool:
    """`await nc.publish(subject, payload, reply, headers)` without awaiting: True when
    done (the same bytes queued, the same flusher woken, the same stats counted), False
    when nothing was done because nats-py's own path might wait or do more (not
    connected, draining, an outgoing buffer to force out, a flusher to replace, an
    oversized payload): the caller then awaits nc.publish. Raises what nc.publish
    raises for a bad subject, reply or header name."""
    if nc._status != _LibraryClient.CONNECTED:
        return False
    if not nc._skip_subject_validation:
        _validate_subject(subject)
        if reply:
            _validate_subject(reply)
    elif not subject:
        raise errors.BadSubjectError  # what _send_publish checks when validation is off
    size = len(payload)
    if size > nc._max_payload:
        return False
    command = publish_command(subject, reply, payload, headers)
    pending_size = nc._pending_data_size + len(command)
    limit = nc._max_pending_size
    queue = nc._flush_queue
    flusher = nc._flusher_task
    if (limit > 0 and pending_size > limit) or queue is None or flusher is None or flusher.done():
        return False
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += size
    nc._pending.append(command)
    nc._pending_data_size = pending_size
    if queue.empty():  # kick the flusher (it writes everything pending at once)
        queue.put_nowait(asyncio.get_running_loop().create_future())
    return True
