"""One WebSocket connection: its user, rooms, limits, and its outgoing frames.

Fan-out must never wait on a socket, and must be cheap per recipient. So a frame is
written straight to the connection's transport while that transport accepts writes (the
usual case: a write is a buffer append). Only when the transport pushes back (its buffer
is over the high-water mark: the client is not reading fast enough) do frames go to a
bounded backlog drained by a writer task that exists only while there is a backlog. A
full backlog means the client can't keep up: it is closed with 4008, and nobody else
waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from chatlib import ids
from chatlib.limits import AbuseGuard, TokenBucket
from websockets.protocol import State

from gateway import metrics
from gateway.frames import CLOSE_TOO_SLOW
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]

# How long a close frame may take to get out before the TCP connection is cut.
CLOSE_WRITE_TIMEOUT = 2.0
# Durable sends one socket may have waiting for their JetStream ack at a time. Publishes
# go out in the order the client sent them (one NATS connection keeps that order), so
# the room order is unchanged; acks carry client_id, so their order does not matter.
MAX_SENDS_IN_FLIGHT = 16


def _text_frame(payload: bytes) -> bytes:
    """RFC 6455 unmasked, unfragmented text frame (what a server sends)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


class _WireCache:
    """The wire bytes of the frame being fanned out: one frame goes to many sockets in a
    row (and a message has at most two renderings), so two entries are enough."""

    __slots__ = ("texts", "wires")

    def __init__(self) -> None:
        self.texts: list[str | None] = [None, None]
        self.wires: list[bytes] = [b"", b""]

    def wire(self, text: str) -> bytes:
        texts = self.texts
        if texts[0] is text:
            return self.wires[0]
        if texts[1] is text:
            return self.wires[1]
        wire = _text_frame(text.encode())
        texts[1], self.wires[1] = texts[0], self.wires[0]
        texts[0], self.wires[0] = text, wire
        return wire


_WIRE = _WireCache()


class _Cork:
    """Frames written during one event-loop iteration are joined per socket and written
    at its end: one system call per socket per iteration instead of one per frame (a
    NATS read often carries several messages, and an ack travels with its message)."""

    __slots__ = ("dirty", "scheduled")

    def __init__(self) -> None:
        self.dirty: list[Session] = []
        self.scheduled = False

    def add(self, session: Session) -> None:
        self.dirty.append(session)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        dirty, self.dirty, self.scheduled = self.dirty, [], False
        for session in dirty:
            session.flush_out()


_CORK = _Cork()


def _direct_protocol(send: Send) -> Any:
    """uvicorn's websockets-sansio protocol behind `send`, when frames can be written to
    its transport directly (no per-message compression); else None (use `send`)."""
    protocol = getattr(send, "__self__", None)
    conn = getattr(protocol, "conn", None)
    if conn is None or not hasattr(protocol, "writable") or getattr(conn, "extensions", True):
        return None
    return protocol


class Session:
    __slots__ = (
        "_backlog",
        "_closer",
        "_limit",
        "_out",
        "_protocol",
        "_replayed_ahead",
        "_replayed_max",
        "_send",
        "_send_waiters",
        "_writer",
        "abuse",
        "bucket",
        "close_code",
        "closing",
        "expires_at",
        "expiry",
        "holder",
        "id",
        "live_buffer",
        "operator",
        "read_bucket",
        "rooms",
        "sends",
        "user",
    )

    def __init__(self, user: str, send: Send, settings: GatewaySettings) -> None:
        self.id = ids.new_id()
        self.user = user
        self.rooms: set[str] = set()
        # The token carries the operator role: may delete anyone's message (issue 14).
        self.operator = False
        self._send = send
        self._protocol = _direct_protocol(send)
        self._limit = settings.send_queue_frames
        # Frames waiting for the transport to accept writes again (None: nothing waits).
        self._backlog: deque[str] | None = None
        self._writer: asyncio.Task[None] | None = None
        # Wire frames written this loop iteration, not yet handed to the transport (_Cork).
        self._out: list[bytes] | None = None
        # Writes (send, dm, typing) and reads (history, join, leave) have separate budgets.
        self.bucket = TokenBucket(settings.rate_per_second, settings.rate_burst)
        self.read_bucket = TokenBucket(settings.read_rate_per_second, settings.read_rate_burst)
        self.abuse = AbuseGuard(settings.abuse_max_violations, settings.abuse_window)
        # While hello is being answered (welcome, recovery replay), live messages wait
        # here as (seq, frame) so that they go out after the replay, without duplicates.
        self.live_buffer: list[tuple[int, str]] | None = []
        # Replayed messages the hub had not handed on yet (a room's log is read from the
        # stream, which can be ahead of the live subscription): their live copy is
        # dropped. None once the live messages are past them all (_replayed_max).
        self._replayed_ahead: set[int] | None = None
        self._replayed_max = 0
        self.closing = False
        self.close_code: int | None = None
        self._closer: asyncio.Task[None] | None = None
        # Durable sends waiting for JetStream (counted by send_started/send_done), and
        # who waits for one of them to end (None: nobody; an idle socket keeps no list).
        self.sends = 0
        self._send_waiters: list[asyncio.Future[None]] | None = None
        # The token (see gateway.reauth): when it expires, and the guest name reservation
        # it is bound to ("" unless guest mode). `auth` frames move expires_at on.
        self.expires_at = 0.0
        # The second its expiry timer is filed under (gateway.reauth); None: none.
        self.expiry: int | None = None
        self.holder = ""

    # --- outgoing -----------------------------------------------------------------------
    def push(self, frame: str) -> None:
        """Send a frame now if the socket takes it, else queue it; a full queue means the
        client can't keep up: cut it off."""
        if self.closing:
            return
        if self._backlog is None:
            if self._write_now(frame):
                metrics.FRAMES_OUT.value += 1
                return
            self._backlog = deque()
        if len(self._backlog) >= self._limit:
            metrics.SLOW_DISCONNECTS.inc()
            log.info("closing slow client", extra={"user": self.user, "conn": self.id})
            self.close_soon(CLOSE_TOO_SLOW, "too slow: send queue full")
            return
        self._backlog.append(frame)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.id}")

    def _write_now(self, frame: str) -> bool:
        protocol = self._protocol
        if protocol is None or not protocol.writable.is_set():
            return False
        transport = protocol.transport
        if protocol.close_sent or transport.is_closing() or protocol.conn.state is not State.OPEN:
            return False
        if self._out is None:
            self._out = [_WIRE.wire(frame)]
            _CORK.add(self)
        else:
            self._out.append(_WIRE.wire(frame))
        return True

    def flush_out(self) -> None:
        out, self._out = self._out, None
        if not out:
            return
        transport = self._protocol.transport
        if not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def deliver_live(self, seq: int, frame: str) -> None:
        if self.live_buffer is not None:
            self.live_buffer.append((seq, frame))
            return
        ahead = self._replayed_ahead
        if ahead is not None:
            if seq in ahead:
                ahead.discard(seq)  # sent in the replay already
                if not ahead:
                    self._replayed_ahead = None
                return
            if seq > self._replayed_max:
                self._replayed_ahead = None  # live is past the replay: none can repeat
        self.push(frame)

    def end_buffering(self, after_seq: int, replay: list[tuple[int, str]] | None = None) -> None:
        """Flush live messages held during hello after `after_seq`. With a `replay`
        (seq, frame), merge the two in seq order, each message once: a shared replay
        (replay_cache.py) may hold messages that also came live, and live ones it lacks."""
        buffered, self.live_buffer = self.live_buffer or [], None
        if replay is not None:
            replayed = {seq for seq, _ in replay}
            came_live = {s for s, _ in buffered}
            buffered = sorted(
                [*replay, *((s, f) for s, f in buffered if s > after_seq and s not in replayed)]
            )
            after_seq = -1
            # Replayed but not (yet) live: if the hub still hands them on, drop them then.
            ahead = replayed - came_live
            if ahead:
                self._replayed_ahead, self._replayed_max = ahead, max(ahead)
        for seq, frame in buffered:
            if seq > after_seq:
                self.push(frame)

    async def _write_loop(self) -> None:
        backlog = self._backlog
        try:
            while backlog:
                # send() waits until the transport accepts writes again.
                await self._send({"type": "websocket.send", "text": backlog.popleft()})
                metrics.FRAMES_OUT.value += 1
                # Writable again with nothing else waiting: back to direct writes.
            self._backlog = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away; the receive loop sees it too
            log.debug("writer ended: %s", exc)
        finally:
            self._writer = None

    # --- durable sends in flight ----------------------------------------------------------
    # A send is not a task: its publish goes out from the receive loop and a callback on
    # its PubAck answers the client (gateway.handlers.send_event). Only the count is kept
    # here, to bound it per socket and to let a closing socket wait for its acks.
    async def send_started(self) -> None:
        """Count a send in flight; waits while MAX_SENDS_IN_FLIGHT are."""
        while self.sends >= MAX_SENDS_IN_FLIGHT:
            await self._a_send_done()
        self.sends += 1

    def send_done(self) -> None:
        self.sends -= 1
        waiters, self._send_waiters = self._send_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def _a_send_done(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._send_waiters is None:
            self._send_waiters = []
        self._send_waiters.append(waiter)
        await waiter

    async def settle_sends(self) -> None:
        while self.sends:
            await self._a_send_done()

    # --- closing ------------------------------------------------------------------------
    def close_soon(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self._closer = asyncio.create_task(self._close(code, reason))

    async def close(self, code: int, reason: str, flush: bool = False) -> None:
        """Close with `code`; with flush, sends in flight and queued frames go out first."""
        if flush and not self.closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain(), CLOSE_WRITE_TIMEOUT)
        self.close_soon(code, reason)
        if self._closer is not None:
            await asyncio.shield(self._closer)

    async def _drain(self) -> None:
        await self.settle_sends()
        writer = self._writer
        if writer is not None:
            await asyncio.shield(writer)

    async def _stop_writer(self) -> None:
        writer = self._writer
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    async def _close(self, code: int, reason: str) -> None:
        self.close_code = code
        await self._stop_writer()
        self.flush_out()  # frames written before the close go out before it
        try:
            await asyncio.wait_for(
                self._send({"type": "websocket.close", "code": code, "reason": reason}),
                CLOSE_WRITE_TIMEOUT,
            )
        except TimeoutError:
            # The client's TCP window is full (it stopped reading): even the close frame
            # cannot get out. Cut the connection so it never holds memory or a task.
            self._abort_transport()
        except Exception as exc:
            log.debug("close failed: %s", exc)

    def _abort_transport(self) -> None:
        protocol = getattr(self._send, "__self__", None)
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.abort()

    async def finished(self) -> None:
        """Stop the writer (the socket is gone)."""
        self.closing = True
        await self._stop_writer()
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await self._closer
