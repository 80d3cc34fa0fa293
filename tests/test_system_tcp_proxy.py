"""The fault-injection proxy itself: each fault does what the network tests rely on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.tcp_proxy import TcpProxy


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    writer.close()
    return data


async def test_proxy_forwards_and_adds_the_requested_delay(echo_port: int) -> None:
    with TcpProxy(echo_port) as proxy:
        assert await roundtrip(proxy.port) == b"ping"
        proxy.set_pass(delay=0.2)
        started = time.monotonic()
        assert await roundtrip(proxy.port) == b"ping"
        assert time.monotonic() - started >= 0.4  # 0.2 s each way


async def test_proxy_reset_aborts_open_connections_and_then_lets_clients_back(
    echo_port: int,
) -> None:
    with TcpProxy(echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"
        await asyncio.to_thread(proxy.reset_once)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()
        assert await roundtrip(proxy.port) == b"ping"


async def test_proxy_cut_refuses_until_passed_again(echo_port: int) -> None:
    with TcpProxy(echo_port) as proxy:
        await asyncio.to_thread(proxy.cut)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await roundtrip(proxy.port)
        await asyncio.to_thread(proxy.set_pass)
        assert await roundtrip(proxy.port) == b"ping"


async def test_proxy_stall_holds_bytes_until_the_link_comes_back(echo_port: int) -> None:
    with TcpProxy(echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await asyncio.to_thread(proxy.stall)
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.5)
        await asyncio.to_thread(proxy.set_pass)
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
        writer.close()
