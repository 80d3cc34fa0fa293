"""uvicorn's websockets-sansio protocol, slimmed for many idle sockets (issue 18).

The gateway holds tens of thousands of sockets that mostly wait, so what one idle socket
keeps counts more than the speed of any one frame. The stock protocol object keeps, per
socket: an instance dict of ~37 attributes (too many for Python's shared-key dicts,
~1.6 KiB), an `asyncio.Queue` for received events (four deques of ~760 B: its items, getters,
putters, and the deque of its `join()` Event), an `asyncio.Event` for `writable` (one more
deque), and the parsed handshake request and response (their headers: ~2 KiB) long after
the handshake. Here every attribute is a slot, the queue and the event are single-consumer
equivalents that hold no buffer while idle, and the handshake objects are dropped once
answered. Behaviour is uvicorn's: only storage changes (tests/test_wsprotocol.py pins
that every attribute uvicorn sets has a slot, and the queue/event semantics we rely on).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# Every attribute uvicorn's WebSocketsSansIOProtocol assigns (uvicorn 0.54); one it adds
# later lands in the instance dict: still correct, just bigger (the test names it).
PROTOCOL_ATTRIBUTES = (
    "app",
    "app_state",
    "asgi_version",
    "client",
    "close_sent",
    "close_timeout",
    "close_timer",
    "config",
    "conn",
    "connections",
    "curr_msg_data_type",
    "default_headers",
    "disconnected",
    "frames",
    "handshake_complete",
    "handshake_initiated",
    "initial_response",
    "last_ping_rtt",
    "logger",
    "loop",
    "pending_ping_payload",
    "ping_interval",
    "ping_sent_at",
    "ping_timeout",
    "ping_timer",
    "pong_timer",
    "queue",
    "read_paused",
    "request",
    "response",
    "root_path",
    "scheme",
    "scope",
    "server",
    "tasks",
    "transport",
    "writable",
)


class Inbox:
    """The received-events queue: `put_nowait`, `get`, `empty` of `asyncio.Queue` for the
    one reader an ASGI connection has (the app's `receive`). Holds no buffer while empty."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    async def get(self) -> Any:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        items = self._items
        item = items.pop(0)
        if not items:
            self._items = None
        return item


class Flag:
    """`asyncio.Event` (is_set, set, clear, wait) whose waiter list exists only while
    someone waits: `writable` is set almost always, and nobody waits on an idle socket."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            return await waiter
        finally:
            waiters = self._waiters
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    self._waiters = None


class SlimWebSocketProtocol(WebSocketsSansIOProtocol):
    """WebSocketsSansIOProtocol with slots, a lean queue and event, and no handshake
    objects kept past the handshake (pass as uvicorn.Config(ws=...))."""

    __slots__ = PROTOCOL_ATTRIBUTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        writable = Flag()
        writable.set()
        self.writable = writable  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # uvicorn never reads the request again (its headers are in the ASGI scope), but
        # websockets' parser generator keeps it as a local for the socket's life: empty
        # its headers (~1.6 KiB) rather than only dropping our reference.
        self.request = None  # type: ignore[assignment]
        event.headers.clear()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            # The 101 response is written; only the handshake read it.
            self.response = None  # type: ignore[assignment]
