"""A small TCP proxy for network-fault tests: put it between a service and NATS/Postgres,
then cut, stall, delay or reset the connections it carries.

It runs its own event loop in a thread, so a test that blocks (starting a process, waiting
on a port) never stalls the traffic it proxies, and faults act at a precise moment.

Modes:
- pass:   bytes flow both ways (optionally with `delay` seconds added per chunk).
- stall:  connections stay open but no byte moves (a black hole: a dead switch, a
          partition where packets are dropped). New connections are accepted and hang.
- cut:    every connection is closed (FIN) and new ones are closed at once.
- reset:  every connection is aborted with a TCP RST; new ones are reset at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from concurrent.futures import Future
from typing import Any, Literal

from devtools.servers import free_port

Mode = Literal["pass", "stall", "cut", "reset"]
CHUNK = 64 * 1024


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close so the peer gets RST, not FIN: SO_LINGER with a zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards to upstream_host:upstream_port."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.accepted = 0  # connections accepted so far (tests assert reconnects)
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._resume: asyncio.Event | None = None

    @property
    def url_host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- lifecycle (called from the test's thread) -------------------------------------

    def start(self) -> TcpProxy:
        ready: Future[None] = Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                self._resume = asyncio.Event()
                self._resume.set()
                self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

            try:
                loop.run_until_complete(boot())
            except Exception as exc:
                ready.set_exception(exc)
                return
            ready.set_result(None)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()
        ready.result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults (called from the test's thread; they take effect before returning) -----

    def set_pass(self, delay: float = 0.0) -> None:
        """Let bytes flow again, `delay` seconds added to each chunk in each direction."""
        self._call(self._set("pass", delay))

    def stall(self) -> None:
        self._call(self._set("stall", self.delay))

    def cut(self) -> None:
        """Close every connection (FIN) and refuse new ones until set_pass()."""
        self._call(self._set("cut", self.delay))

    def reset(self) -> None:
        """Abort every connection with RST and reset new ones until set_pass()."""
        self._call(self._set("reset", self.delay))

    def reset_once(self) -> None:
        """RST every current connection, but accept reconnects at once."""
        self._call(self._set("reset", self.delay))
        self._call(self._set("pass", self.delay))

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    # --- inside the proxy's loop -------------------------------------------------------

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None, "proxy not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _set(self, mode: Mode, delay: float) -> None:
        assert self._resume is not None
        self.mode, self.delay = mode, delay
        if mode == "stall":
            self._resume.clear()
            return
        self._resume.set()
        if mode in ("cut", "reset"):
            for pair in list(self._pairs):
                self._close_pair(pair, rst=mode == "reset")

    def _close_pair(
        self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter], rst: bool
    ) -> None:
        self._pairs.discard(pair)
        for writer in pair:
            if rst:
                _abort_with_rst(writer)
            else:
                writer.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            self._close_pair(pair, rst=False)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "reset":
            _abort_with_rst(writer)
            return
        if self.mode == "cut":
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort_with_rst(writer)  # upstream down: the client sees what it would see
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, pair), self._pump(up_reader, writer, pair)
            )
        finally:
            if pair in self._pairs:
                self._close_pair(pair, rst=False)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        assert self._resume is not None
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                # A stall holds the bytes already read until the link comes back, like a
                # partition that drops packets (TCP would retransmit them afterwards).
                await self._resume.wait()
                if pair not in self._pairs:
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if pair in self._pairs:
                # One side finished: pass the half-close on so the other side sees EOF.
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
