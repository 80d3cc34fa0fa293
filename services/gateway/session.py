"""One WebSocket connection: its user, rooms, limits, and a bounded send queue drained by
one writer task, so that fan-out only ever does a put_nowait and never waits on a socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from chatlib import ids

from gateway import metrics
from gateway.frames import CLOSE_TOO_SLOW
from gateway.limits import AbuseGuard, TokenBucket
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]

# How long a close frame may take to get out before the TCP connection is cut.
CLOSE_WRITE_TIMEOUT = 2.0


class Session:
    def __init__(self, user: str, send: Send, settings: GatewaySettings) -> None:
        self.id = ids.new_id()
        self.user = user
        self.rooms: set[str] = set()
        self._send = send
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=settings.send_queue_frames)
        self.bucket = TokenBucket(settings.rate_per_second, settings.rate_burst)
        self.abuse = AbuseGuard(settings.abuse_max_violations, settings.abuse_window)
        # While hello is being answered (welcome, recovery replay), live messages wait
        # here as (seq, frame) so that they go out after the replay, without duplicates.
        self.live_buffer: list[tuple[int, str]] | None = []
        self.closing = False
        self.close_code: int | None = None
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.id}")
        self._closer: asyncio.Task[None] | None = None

    # --- outgoing -----------------------------------------------------------------------
    def push(self, frame: str) -> None:
        """Queue a frame; a full queue means the client can't keep up: cut it off."""
        if self.closing:
            return
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            metrics.SLOW_DISCONNECTS.inc()
            log.info("closing slow client", extra={"user": self.user, "conn": self.id})
            self.close_soon(CLOSE_TOO_SLOW, "too slow: send queue full")

    def deliver_live(self, seq: int, frame: str) -> None:
        if self.live_buffer is not None:
            self.live_buffer.append((seq, frame))
        else:
            self.push(frame)

    def end_buffering(self, after_seq: int) -> None:
        """Flush live messages held during hello, skipping those the replay covered."""
        buffered, self.live_buffer = self.live_buffer or [], None
        for seq, frame in buffered:
            if seq > after_seq:
                self.push(frame)

    async def _write_loop(self) -> None:
        try:
            while True:
                frame = await self.queue.get()
                try:
                    await self._send({"type": "websocket.send", "text": frame})
                finally:
                    self.queue.task_done()
                metrics.FRAMES_OUT.inc()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away; the receive loop sees it too
            log.debug("writer ended: %s", exc)

    # --- closing ------------------------------------------------------------------------
    def close_soon(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self._closer = asyncio.create_task(self._close(code, reason))

    async def close(self, code: int, reason: str, flush: bool = False) -> None:
        """Close with `code`; with flush, frames already queued go out first."""
        if flush and not self.closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain(), CLOSE_WRITE_TIMEOUT)
        self.close_soon(code, reason)
        if self._closer is not None:
            await asyncio.shield(self._closer)

    async def _drain(self) -> None:
        if not self._writer.done():
            await self.queue.join()

    async def _close(self, code: int, reason: str) -> None:
        self.close_code = code
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._writer
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
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._writer
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await self._closer
