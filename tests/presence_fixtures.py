"""Real presence replicas, stand-in gateway processes and an event recorder for the
presence tests."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson
import pytest
from chatlib import codec, names
from chatlib.proto.chat import v1 as pb
from devtools.processes import ServiceProcess
from devtools.servers import free_port, url_as
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

FAKE_GATEWAY = Path(__file__).with_name("presence_fake_gateway.py")

# Fast settings so a dead gateway shows in seconds; docs/presence.md gives the defaults.
TEST_HEARTBEAT_INTERVAL = 0.5
TEST_GATEWAY_EXPIRY = 3.0
TEST_SWEEP_INTERVAL = 0.25


class PresenceReplicas:
    """`python -m presence` processes against one NATS server."""

    def __init__(self, nats_url: str, logs_dir: Path) -> None:
        self.nats_url = nats_url
        self.logs_dir = logs_dir
        self.procs: list[ServiceProcess] = []

    def start(self, count: int = 1) -> list[ServiceProcess]:
        started = []
        for _ in range(count):
            port = free_port()
            index = len(self.procs)
            proc = ServiceProcess(
                "presence",
                env={
                    "PRESENCE_NATS_SERVERS": url_as(self.nats_url, "presence"),
                    "PRESENCE_HTTP_PORT": str(port),
                    "PRESENCE_HTTP_HOST": "127.0.0.1",
                    "PRESENCE_GATEWAY_EXPIRY": str(TEST_GATEWAY_EXPIRY),
                    "PRESENCE_SWEEP_INTERVAL": str(TEST_SWEEP_INTERVAL),
                    "PRESENCE_INSTANCE_ID": f"presence-test-{index}",
                    "PRESENCE_DRAIN_TIMEOUT": "5",
                },
                http_port=port,
                log_file=self.logs_dir / f"presence-{index}.log",
            )
            self.procs.append(proc.start())
            started.append(proc)
        return started

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.terminate(10)


def open_log(path: Path) -> BinaryIO:
    return open(path, "ab")


class FakeGateway:
    """tests/presence_fake_gateway.py as a child process, driven over stdin."""

    def __init__(self, nats_url: str, gateway_id: str, interval: float, log_file: Path) -> None:
        self.nats_url = nats_url
        self.gateway_id = gateway_id
        self.interval = interval
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> FakeGateway:
        log = open_log(self.log_file)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(FAKE_GATEWAY),
            self.nats_url,
            self.gateway_id,
            str(self.interval),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        assert await self._answer() == "ready"
        return self

    async def _answer(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 10)
        return line.decode().strip()

    async def command(self, *words: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((" ".join(words) + "\n").encode())
        await self.proc.stdin.drain()
        assert await self._answer() == "ok"

    async def open(self, connection_id: str, user: str) -> None:
        await self.command("open", connection_id, user)

    async def close(self, connection_id: str, user: str) -> None:
        await self.command("close", connection_id, user)

    async def kill(self) -> None:
        """SIGKILL: no close is reported, the heartbeats just stop."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"quit\n")
        await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            await self.kill()


@dataclass
class EventLog:
    """Every presence event seen on presence.event.>, in arrival order."""

    events: list[tuple[str, str]] = field(default_factory=list)  # (kind, user)
    ids: list[str] = field(default_factory=list)  # Nats-Msg-Id of each, same order

    async def on_message(self, msg: Msg) -> None:
        self.ids.append((msg.headers or {}).get(names.HEADER_MSG_ID, ""))
        if msg.subject.startswith(names.PRESENCE_EVENT_ONLINE + "."):
            user = codec.decode_as(pb.UserOnline, msg.data, msg.headers).user
            self.events.append(("online", user))
        else:
            user = codec.decode_as(pb.UserOffline, msg.data, msg.headers).user
            self.events.append(("offline", user))

    def of(self, user: str) -> list[str]:
        return [kind for kind, who in self.events if who == user]

    def count(self, kind: str, user: str) -> int:
        return self.of(user).count(kind)


async def live_connections(nc: NATS, user: str) -> set[str]:
    """The connection ids presence stores for `user` (read straight from the bucket)."""
    kv = await nc.jetstream().key_value(names.KV_PRESENCE)
    try:
        entry = await kv.get(f"user.{user}")
    except KeyNotFoundError:
        return set()
    return set(orjson.loads(entry.value or b"{}").get("conns", {}))


def new_id() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def presence_replicas(nats_server: object, nc: NATS, logs_dir: Path) -> Iterator[PresenceReplicas]:
    replicas = PresenceReplicas(nats_server.url, logs_dir)  # type: ignore[attr-defined]
    yield replicas
    replicas.stop_all()


@pytest.fixture
async def gateways(nats_server: object, logs_dir: Path) -> AsyncIterator[list[FakeGateway]]:
    """Call `add(gateway_id)` style: append started FakeGateways; all stopped at the end."""
    started: list[FakeGateway] = []
    yield started
    for gateway in started:
        await gateway.kill()


async def start_gateway(
    started: list[FakeGateway], nats_url: str, logs_dir: Path, gateway_id: str
) -> FakeGateway:
    gateway = FakeGateway(
        nats_url, gateway_id, TEST_HEARTBEAT_INTERVAL, logs_dir / f"{gateway_id}.log"
    )
    started.append(await gateway.start())
    return gateway


@pytest.fixture
async def event_log(nc: NATS) -> AsyncIterator[EventLog]:
    log = EventLog()
    sub = await nc.subscribe(names.PRESENCE_EVENTS_ALL, cb=log.on_message)
    await nc.flush()
    yield log
    await sub.unsubscribe()
