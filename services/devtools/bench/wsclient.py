"""A minimal WebSocket client on a raw asyncio Protocol: the load generator's socket.

The `websockets` client spends tens of microseconds per frame (futures, frame objects,
UTF-8 decoding); here a received frame costs a header parse and one callback, so one
load-generator process can take 100k+ frames/s and stay out of the measurement. Frames
we send use an all-zero mask key, which RFC 6455 allows and which makes masking a no-op.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable
from typing import cast

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

FrameHandler = Callable[[bytes], None]


class HandshakeError(Exception):
    """The server refused the upgrade (status other than 101) or closed first.
    `retry_after`: the seconds of a Retry-After header, when the refusal had one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(head: bytes) -> float | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"retry-after":
            try:
                return float(value.strip())
            except ValueError:
                return None
    return None


class WsConnection(asyncio.Protocol):
    def __init__(self, on_text: FrameHandler | None = None) -> None:
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._upgraded = False
        self.handshake_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.close_code = 0

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            status_line = head.split(b"\r\n", 1)[0]
            del buf[: end + 4]
            if b" 101 " not in status_line + b" ":
                message = status_line.decode(errors="replace")
                self._fail(HandshakeError(message, _retry_after(head)))
                return
            self._upgraded = True
            if not self.handshake_done.done():
                self.handshake_done.set_result(None)
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        size = len(buf)
        on_text = self.on_text
        while size - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            end = pos + head + length
            if end > size:
                break
            opcode = b0 & 0x0F
            if opcode == OP_TEXT or opcode == OP_BINARY:
                if on_text is not None:
                    on_text(bytes(buf[pos + head : end]))
            elif opcode == OP_PING:
                self._send_frame(OP_PONG, bytes(buf[pos + head : end]))
            elif opcode == OP_CLOSE:
                payload = buf[pos + head : end]
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if self.transport is not None:
                    self.transport.close()
            pos = end
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(HandshakeError("connection closed before the upgrade"))
        if not self.closed.done():
            self.closed.set_result(self.close_code or 1006)

    def _fail(self, exc: Exception) -> None:
        if not self.handshake_done.done():
            self.handshake_done.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    # --- sending ----------------------------------------------------------------------
    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.transport.write(head + b"\x00\x00\x00\x00" + payload)

    def send_text(self, payload: bytes) -> None:
        self._send_frame(OP_TEXT, payload)

    def close(self, code: int = 1000) -> None:
        self._send_frame(OP_CLOSE, struct.pack("!H", code))
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect(
    host: str,
    port: int,
    path: str = "/ws",
    on_text: FrameHandler | None = None,
    timeout: float = 30.0,
    host_header: str | None = None,
) -> WsConnection:
    """Open a socket and complete the upgrade; frames go to `on_text` from then on."""
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: WsConnection(on_text), host, port), timeout
    )
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host_header or f'{host}:{port}'}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert conn.transport is not None
    conn.transport.write(request.encode())
    await asyncio.wait_for(conn.handshake_done, timeout)
    return conn
