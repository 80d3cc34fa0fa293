"""Gateways as real processes, and a small WebSocket chat client, for any test to reuse.

    from tests.gateway_fixtures import ChatClient, gateways, start_gateways  # noqa: F401

    async def test_x(gateways):                 # two gateways, gw-a and gw-b
        alice = await ChatClient.connect(gateways[0], "alice", rooms=["dev"])
        await alice.send_room("dev", "hi")
        await alice.expect(type="ack")

`start_gateways(nats_url, logs_dir, count, env)` is a context manager for tests that need
other settings (small queues, JWT mode, ...). Request the `nc` fixture before starting
gateways (the `gateways` fixture does): it wipes streams, and gateways provision them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from devtools.processes import ServiceProcess
from devtools.servers import free_port, url_as
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection

from tests.waiting import wait_until


@dataclass
class GatewayProc:
    name: str
    port: int
    proc: ServiceProcess

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def metric(self, name: str, labels: str = "") -> float:
        """A metric's value from /metrics (0 when absent); labels like 'code="x"'."""
        with urllib.request.urlopen(f"{self.http_url}/metrics", timeout=2) as resp:
            text = resp.read().decode()
        wanted = f"{name}{{{labels}}}" if labels else name
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == wanted:
                total += float(value)
        return total


@contextlib.contextmanager
def start_gateways(
    nats_url: str, logs_dir: Path, count: int = 2, env: dict[str, str] | None = None
) -> Iterator[list[GatewayProc]]:
    """`count` gateway processes (gw-a, gw-b, ...) on free ports, ready, stopped after."""
    started: list[GatewayProc] = []
    try:
        for i in range(count):
            name = f"gw-{chr(ord('a') + i)}"
            port = free_port()
            proc = ServiceProcess(
                "gateway",
                env={
                    "GATEWAY_NATS_SERVERS": url_as(nats_url, "gateway"),
                    "GATEWAY_HTTP_PORT": str(port),
                    "GATEWAY_HTTP_HOST": "127.0.0.1",
                    "GATEWAY_INSTANCE_ID": name,
                    "GATEWAY_DRAIN_TIMEOUT": "3",
                    **(env or {}),
                },
                http_port=port,
                log_file=logs_dir / f"{name}.log",
            )
            started.append(GatewayProc(name, port, proc))
            proc.start(wait_ready=False)
        for gw in started:
            gw.proc.wait_ready()
        yield started
    finally:
        for gw in started:
            gw.proc.terminate(timeout=10)


@pytest.fixture
def gateways(nc: NATS, nats_server: Any, logs_dir: Path) -> Iterator[list[GatewayProc]]:
    """Two gateways (gw-a, gw-b) with default settings on the session's NATS."""
    with start_gateways(nats_server.url, logs_dir, 2) as gws:
        yield gws


# One person per name in these tests: a name's token is asked for once and reused (a
# second POST /api/guest for a name that is held gets name_taken, as for a real second
# person). The gateway takes a lapsed reservation back on the token's next hello.
_GUEST_TOKENS: dict[str, str] = {}


def guest_token(gw: GatewayProc, name: str) -> str:
    """A signed guest token for `name` from POST /api/guest (the first time; then the same)."""
    if name not in _GUEST_TOKENS:
        _GUEST_TOKENS[name] = new_guest_token(gw, name)
    return _GUEST_TOKENS[name]


def new_guest_token(gw: GatewayProc, name: str) -> str:
    """POST /api/guest: a signed guest token for `name`."""
    request = urllib.request.Request(
        f"{gw.http_url}/api/guest",
        data=orjson.dumps({"name": name}),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        return str(orjson.loads(resp.read())["token"])


def http_json(gw: GatewayProc, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, decoded JSON body) of a GET (or a POST when body is given); blocking."""
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(
        f"{gw.http_url}{path}", data=data, method="POST" if data else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status), orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), orjson.loads(exc.read() or b"null")


Frame = dict[str, Any]


@dataclass
class ChatClient:
    """One WebSocket session; a background task collects every server frame in `frames`."""

    ws: ClientConnection
    user: str
    frames: list[Frame] = field(default_factory=list)
    welcome: Frame = field(default_factory=dict)
    close_code: int | None = None
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        gw: GatewayProc,
        user: str,
        rooms: list[str] | None = None,
        resume_seq: int | None = None,
        token: str | None = None,
        origin: str | None = None,
        hello_extra: Frame | None = None,
        **ws_options: Any,
    ) -> ChatClient:
        """Connect, say hello with a guest token (unless given one) and any `hello_extra`
        fields, wait for welcome."""
        client = await cls.open(gw, user, origin=origin, **ws_options)
        hello: Frame = {
            "type": "hello",
            "v": 1,
            "token": token or await asyncio.to_thread(guest_token, gw, user),
        }
        if rooms is not None:
            hello["rooms"] = rooms
        if resume_seq is not None:
            hello["resume_seq"] = resume_seq
        hello.update(hello_extra or {})
        await client.send(hello)
        client.welcome = await client.expect(type="welcome")
        return client

    @classmethod
    async def open(
        cls, gw: GatewayProc, user: str = "", origin: str | None = None, **ws_options: Any
    ) -> ChatClient:
        """Only the WebSocket handshake (no hello yet)."""
        ws = await websockets.connect(gw.ws_url, origin=origin, **ws_options)  # type: ignore[arg-type]
        client = cls(ws, user)
        client._reader = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(orjson.loads(raw))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code if self.ws.close_code is not None else 1006

    async def send(self, frame: Frame | str | bytes) -> None:
        await self.ws.send(
            frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode()
        )

    async def send_room(self, room: str, content: str, client_id: str | None = None) -> str:
        cid = client_id or f"c-{uuid.uuid4().hex[:12]}"
        await self.send({"type": "send", "room": room, "content": content, "client_id": cid})
        return cid

    async def send_dm(self, to: str, content: str, client_id: str | None = None) -> str:
        cid = client_id or f"c-{uuid.uuid4().hex[:12]}"
        await self.send({"type": "dm", "to": to, "content": content, "client_id": cid})
        return cid

    def matching(self, **fields: Any) -> list[Frame]:
        return [f for f in self.frames if all(f.get(k) == v for k, v in fields.items())]

    async def expect(self, timeout: float = 5.0, **fields: Any) -> Frame:
        """The first frame (already received or coming) whose fields match."""
        found = await wait_until(
            lambda: self.matching(**fields), f"{self.user}: frame {fields}", timeout
        )
        assert isinstance(found, list)
        return found[0]

    async def expect_count(self, count: int, timeout: float = 5.0, **fields: Any) -> list[Frame]:
        await wait_until(
            lambda: len(self.matching(**fields)) >= count,
            f"{self.user}: {count} frames {fields}",
            timeout,
        )
        return self.matching(**fields)

    async def expect_closed(self, timeout: float = 5.0) -> int:
        await wait_until(lambda: self.close_code is not None, f"{self.user}: closed", timeout)
        assert self.close_code is not None
        return self.close_code

    def messages(self, **fields: Any) -> list[Frame]:
        return self.matching(type="message", **fields)

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


@contextlib.asynccontextmanager
async def clients(*pending: Any) -> AsyncIterator[list[ChatClient]]:
    """Await several ChatClient.connect(...) and close them all at the end."""
    opened = [await p for p in pending]
    try:
        yield opened
    finally:
        for c in opened:
            with contextlib.suppress(Exception):
                await c.close()


class StalledClient:
    """A raw WebSocket client that says hello and then never reads: its TCP receive
    window fills, as with a client on a hopeless link. For slow-client tests."""

    def __init__(self, gw: GatewayProc, user: str, rooms: list[str]) -> None:
        self.gw, self.user, self.rooms = gw, user, rooms
        self.sock: socket.socket | None = None

    def start(self) -> StalledClient:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.gw.port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.gw.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(1)  # byte by byte: leave any frame after it unread
        assert b" 101 " in response.split(b"\r\n", 1)[0], response
        token = guest_token(self.gw, self.user)
        hello = {"type": "hello", "v": 1, "token": token, "rooms": self.rooms}
        sock.sendall(_masked_text_frame(orjson.dumps(hello)))
        self.sock = sock
        return self

    def drain_until_closed(self, timeout: float = 10.0) -> bytes:
        """Read everything left; returns the bytes (ends at EOF or reset)."""
        assert self.sock is not None
        self.sock.settimeout(timeout)
        data = b""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def _masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    header = bytearray([0x81])
    if len(payload) < 126:
        header.append(0x80 | len(payload))
    elif len(payload) < 65536:
        header.append(0x80 | 126)
        header += len(payload).to_bytes(2, "big")
    else:
        header.append(0x80 | 127)
        header += len(payload).to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(header) + mask + masked


Predicate = Callable[[Frame], bool]
