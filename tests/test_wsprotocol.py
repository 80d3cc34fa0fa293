"""The gateway's slimmed uvicorn WebSocket protocol (gateway/wsprotocol.py, issue 18):
behaves like uvicorn's websockets-sansio protocol, and an open idle socket keeps no
instance dict, no handshake objects, and no queue or waiter buffers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from gateway.wsprotocol import PROTOCOL_ATTRIBUTES, Flag, Inbox, SlimWebSocketProtocol
from uvicorn.server import ServerState
from websockets.asyncio.client import connect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoApp:
    """Echoes text frames; remembers each connection's protocol (behind `send`)."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        self.protocols.append(send.__self__)
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            event = await receive()
            if event["type"] != "websocket.receive":
                return
            await send({"type": "websocket.send", "text": "echo:" + event["text"]})


@contextlib.asynccontextmanager
async def serving(app: EchoApp, **config: Any) -> AsyncIterator[int]:
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ws=SlimWebSocketProtocol,
            lifespan="off",
            log_config=None,
            **config,
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not server.started:
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_an_idle_socket_keeps_no_dict_handshake_or_buffers() -> None:
    app = EchoApp()
    async with serving(app) as port, connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"
        (protocol,) = app.protocols
        # Every attribute uvicorn sets has a slot: a new uvicorn that adds one shows here
        # (add it to PROTOCOL_ATTRIBUTES).
        assert vars(protocol) == {}, f"unslotted attributes: {sorted(vars(protocol))}"
        assert protocol.request is None and protocol.response is None
        # websockets' parser keeps the parsed request; its headers are emptied.
        request = protocol.conn.parser.gi_frame.f_locals.get("request")
        assert request is None or len(request.headers) == 0
        assert isinstance(protocol.queue, Inbox) and protocol.queue.empty()
        assert protocol.queue._items is None and protocol.queue._waiter is not None
        assert protocol.writable.is_set() and protocol.writable._waiters is None
    # Gone: the app saw the disconnect and returned.
    await _until(lambda: protocol.transport.is_closing())


def test_every_attribute_of_the_stock_protocol_is_listed() -> None:
    """The slot list against uvicorn's own __init__ (before any socket is made)."""
    config = uvicorn.Config(EchoApp(), ws=SlimWebSocketProtocol)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        protocol = SlimWebSocketProtocol(config, ServerState(), {}, _loop=loop)
    finally:
        loop.close()
    assert vars(protocol) == {}
    assert len(set(PROTOCOL_ATTRIBUTES)) == len(PROTOCOL_ATTRIBUTES)


async def test_keepalive_pings_still_go_out_and_get_answered() -> None:
    app = EchoApp()
    async with (
        serving(app, ws_ping_interval=0.05, ws_ping_timeout=2.0) as port,
        connect(f"ws://127.0.0.1:{port}/ws") as ws,
    ):
        await ws.send("x")
        assert await ws.recv() == "echo:x"
        (protocol,) = app.protocols
        # The client answers pings by itself: an RTT is measured and the socket stays open.
        await _until(lambda: protocol.last_ping_rtt > 0)
        await ws.send("y")
        assert await ws.recv() == "echo:y"


async def test_inbox_is_a_fifo_whose_get_waits() -> None:
    inbox = Inbox()
    getter = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert not getter.done()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert await getter == 1
    assert inbox.qsize() == 1 and not inbox.empty()
    assert await inbox.get() == 2
    assert inbox.empty() and inbox._items is None
    # A cancelled get (a timeout around receive) leaves nothing behind and loses nothing.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(inbox.get(), 0.01)
    assert inbox._waiter is None
    inbox.put_nowait(3)
    assert await inbox.get() == 3


async def test_flag_wait_blocks_while_clear_like_asyncio_event() -> None:
    flag = Flag()
    assert not flag.is_set()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert flag._waiters is None
    assert await flag.wait() is True  # set: no wait
    flag.clear()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(flag.wait(), 0.01)
    assert flag._waiters is None  # the cancelled waiter is gone
