"""The whole system as real processes, and WebSocket clients that keep score.

- `ChatSystem`: 2 gateways, 2 archive replicas, 2 presence replicas (counts configurable)
  as `python -m <service>` processes against given NATS URLs and a Postgres database.
  Processes can be SIGKILLed, restarted and replaced one by one.
- `nats_cluster`: three nats-server processes with routes (JetStream replicated x3).
- `ScoringClient`: a WebSocket client that records every message frame (seq, id) per room
  and DM thread, every ack, and reconnects to a live gateway with `resume_seq` when its
  socket dies, re-sending what was not acked with the same client_id.
- `chat_log` / `archived_ids`: the ground truth read back from JetStream and Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import nats
from chatlib import codec, message_events, names
from chatlib.auth import Authenticator
from chatlib.proto.chat import v1 as pb
from devtools.processes import ServiceProcess
from devtools.servers import NatsServer, free_port, url_as
from devtools.servers import start_nats_cluster as start_nats_cluster_processes
from gateway.settings import DEV_SECRET, GatewaySettings
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.waiting import wait_until

# Faster than production so a test sees a dead gateway in seconds, slow enough that a
# CPU-starved gateway on a 2-core CI box does not miss its heartbeats.
TEST_HEARTBEAT_INTERVAL = 1.0
TEST_GATEWAY_EXPIRY = 5.0
# A killed archive replica's unacked batch comes back after this (default 30 s).
TEST_ARCHIVE_ACK_WAIT = 5.0


def mint_token(
    user: str, now: float | None = None, secret: str = DEV_SECRET, holder: str | None = None
) -> str:
    """A guest token as the gateway's /api/guest would issue it (or, with another secret or
    an old `now`, a forged or expired one). Every token minted for one user here has the
    same holder (the test plays one person per name), unless `holder` says otherwise."""
    settings = GatewaySettings(guest_secret=secret)
    token, _ = Authenticator(settings).issue_guest(user, now=now, holder=holder or f"t-{user}")
    return token


# --- the processes ---------------------------------------------------------------------


@dataclass
class ChatSystem:
    nats_urls: list[str]
    database_url: str
    logs_dir: Path
    gateways: int = 2
    archives: int = 2
    presences: int = 2
    rpcs: int = 0
    stream_replicas: int = 1
    # Extra environment per service kind ("gateway", "archive", "presence", "rpc").
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    _generation: Iterator[int] = field(default_factory=itertools.count)

    def _env(self, kind: str, name: str, port: int) -> dict[str, str]:
        prefix = kind.upper() + "_"
        env = {
            prefix + "NATS_SERVERS": ",".join(url_as(u, kind) for u in self.nats_urls),
            prefix + "HTTP_PORT": str(port),
            prefix + "HTTP_HOST": "127.0.0.1",
            prefix + "INSTANCE_ID": name,
            prefix + "STREAM_REPLICAS": str(self.stream_replicas),
            prefix + "LOG_LEVEL": "INFO",
            prefix + "DRAIN_TIMEOUT": "3",
        }
        if kind == "gateway":
            env["GATEWAY_HEARTBEAT_INTERVAL"] = str(TEST_HEARTBEAT_INTERVAL)
        if kind == "presence":
            env["PRESENCE_GATEWAY_EXPIRY"] = str(TEST_GATEWAY_EXPIRY)
            env["PRESENCE_SWEEP_INTERVAL"] = "0.5"
        if kind == "archive":
            env["ARCHIVE_DATABASE_URL"] = self.database_url
            env["ARCHIVE_ACK_WAIT"] = str(TEST_ARCHIVE_ACK_WAIT)
        if kind == "rpc":
            env["RPC_GRPC_HOST"] = "127.0.0.1"
            env["RPC_GRPC_PORT"] = str(free_port())
        env.update(self.extra_env.get(kind, {}))
        return env

    def _new(self, kind: str, name: str) -> ServiceProcess:
        port = free_port()
        gen = next(self._generation)
        proc = ServiceProcess(
            kind, self._env(kind, name, port), port, self.logs_dir / f"{name}-{gen}.log"
        )
        self.procs[name] = proc
        return proc

    def names_of(self, kind: str) -> list[str]:
        return sorted(n for n in self.procs if n.startswith(kind))

    def start(self) -> ChatSystem:
        # Presence and archive first: gateways ask presence for `online` at hello.
        plan = [("presence", self.presences), ("archive", self.archives)]
        plan += [("gateway", self.gateways), ("rpc", self.rpcs)]
        for kind, count in plan:
            started = [self._new(kind, f"{kind}-{i}").start(False) for i in range(count)]
            for proc in started:
                proc.wait_ready(60)
        return self

    def stop(self) -> None:
        # Gateways first so their clients' closes still reach presence.
        for kind in ("gateway", "rpc", "archive", "presence"):
            for name in self.names_of(kind):
                with contextlib.suppress(Exception):
                    self.procs[name].terminate(timeout=10)

    def kill(self, name: str) -> None:
        """SIGKILL one process: no shutdown code runs, as in a crash or an OOM kill."""
        self.procs[name].kill()

    def restart(self, name: str, graceful: bool = True) -> None:
        """Stop (SIGTERM, or SIGKILL when not graceful) and start again on a new port."""
        kind = name.split("-")[0]
        old = self.procs[name]
        if old.proc is not None:
            old.terminate(10) if graceful else old.kill()
        self._new(kind, name).start(wait_ready=True, timeout=60)

    def alive(self, name: str) -> bool:
        proc = self.procs[name].proc
        return proc is not None and proc.poll() is None

    def gateway_ws_urls(self) -> list[str]:
        """WebSocket URLs of the gateways still running, in name order."""
        return [
            f"ws://127.0.0.1:{self.procs[n].http_port}/ws"
            for n in self.names_of("gateway")
            if self.alive(n)
        ]

    def grpc_addresses(self) -> list[str]:
        """host:port of the rpc replicas still running, in name order."""
        return [
            f"127.0.0.1:{self.procs[n].env['RPC_GRPC_PORT']}"
            for n in self.names_of("rpc")
            if self.alive(n)
        ]

    def rpc_at(self, address: str) -> str:
        """The name of the rpc replica serving gRPC at `address`."""
        port = address.rsplit(":", 1)[1]
        return next(n for n in self.names_of("rpc") if self.procs[n].env["RPC_GRPC_PORT"] == port)

    def http_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.procs[name].http_port}"

    def all_ready(self) -> bool:
        return all(p.probe("/readyz") == 200 for p in self.procs.values() if p.proc)

    def log_tail(self, chars: int = 4000) -> str:
        out = []
        for name, proc in sorted(self.procs.items()):
            if proc.log_file.exists():
                out.append(
                    f"--- {name} ({proc.log_file.name})\n{proc.log_file.read_text()[-chars:]}"
                )
        return "\n".join(out)


def http_get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


# --- a 3-node NATS cluster -------------------------------------------------------------


async def start_nats_cluster(base: Path, size: int = 3) -> list[NatsServer]:
    """`size` routed nats-servers with JetStream (devtools.servers.start_nats_cluster);
    returns once a meta leader is elected."""
    servers = await asyncio.to_thread(start_nats_cluster_processes, base, size)
    urls = [s.url for s in servers]
    nc = await nats.connect(servers=urls, max_reconnect_attempts=-1)
    js = nc.jetstream()

    async def meta_leader() -> bool:
        try:
            info = await js.account_info()
            return info is not None
        except Exception:
            return False

    await wait_until(meta_leader, "JetStream meta leader elected", timeout=30, interval=0.2)
    await nc.close()
    return servers


# --- ground truth ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedMessage:
    seq: int
    subject: str
    id: str
    sender: str
    client_id: str


def thread_key_of_subject(subject: str, me: str) -> str | None:
    """The thread key (as ScoringClient uses) a CHAT subject is for `me`; None if not mine."""
    parsed = names.parse_chat_subject(subject)
    if parsed is None:
        return None
    kind, rest = parsed
    if kind == "room":
        return f"room:{rest}"
    lo, hi = rest.split(".")
    if me not in (lo, hi):
        return None
    return f"dm:{hi if me == lo else lo}"


async def chat_log(nc: NATS) -> list[LoggedMessage]:
    """Every message in the CHAT stream, in stream order, read with direct gets."""
    js = nc.jetstream()
    info = await js.stream_info(names.STREAM_CHAT)
    out: list[LoggedMessage] = []
    first, last = info.state.first_seq, info.state.last_seq
    for seq in range(first, last + 1):
        try:
            raw = await js.get_msg(names.STREAM_CHAT, seq)
        except nats.js.errors.NotFoundError:
            continue  # a deleted or expired sequence
        msg = message_events.decode_chat(raw.data or b"", dict(raw.headers or {}))
        if not isinstance(msg, pb.ChatMessage):
            continue  # an edit, delete or reaction (tests/lifecycle_system.py checks those)
        out.append(LoggedMessage(seq, raw.subject or "", msg.id, msg.sender, msg.client_id))
    return out


async def archived_id_counts(database_url: str) -> Counter[str]:
    """How many rows the archive holds per message id (exactly-once means all 1s)."""
    conn = await asyncpg.connect(database_url)
    try:
        table = await conn.fetchval(
            "SELECT table_name FROM information_schema.columns "
            "WHERE table_schema='public' AND column_name='content' LIMIT 1"
        )
        if not table:
            return Counter()  # the archive has not migrated yet
        rows = await conn.fetch(f'SELECT id FROM "{table}"')
    finally:
        await conn.close()
    return Counter(str(r["id"]) for r in rows)


async def who_is_online(nc: NATS) -> list[str]:
    """All users presence reports online, following its pages."""
    users: list[str] = []
    after = ""
    while True:
        reply = await nc.request(
            names.PRESENCE_WHO, bytes(pb.WhoRequest(after=after, limit=500)), timeout=2
        )
        page = codec.decode_as(pb.WhoPage, reply.data, dict(reply.headers or {}))
        users += list(page.users)
        if not page.next_after:
            return users
        after = page.next_after


# --- clients ---------------------------------------------------------------------------


class ClientDied(Exception):
    pass


@dataclass
class ScoringClient:
    """A chat user on one socket that keeps score of everything it sees.

    seen[thread] lists (seq, id) of every message frame in arrival order, where thread is
    "room:<name>" or "dm:<peer>". On a dead socket, `run_supervised` reconnects to a live
    gateway with resume_seq = the highest seq seen and re-sends unacked sends.
    """

    user: str
    rooms: list[str]
    gateway_urls: Callable[[], list[str]]
    origin: str | None = None
    ws: ClientConnection | None = None
    seen: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))
    acks: dict[str, tuple[str, int]] = field(default_factory=dict)
    unacked: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    max_seq: int = 0
    first_seq: int | None = None  # `seq` of the first welcome: what came before is not ours
    reconnects: int = 0
    resumed: list[dict[str, Any]] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    keep_frames: bool = True
    _counter: Iterator[int] = field(default_factory=itertools.count)
    _reader: asyncio.Task[None] | None = None
    _alive: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    _url_index: int = 0

    @property
    def connected(self) -> bool:
        return self._alive.is_set()

    async def connect(self, url: str | None = None, resume: bool = False) -> dict[str, Any]:
        urls = [url] if url else self.gateway_urls()
        if not urls:
            raise ClientDied("no gateway is running")
        url = urls[self._url_index % len(urls)]
        self.ws = await connect(url, origin=self.origin, open_timeout=5, ping_interval=None)  # type: ignore[arg-type]
        hello: dict[str, Any] = {
            "type": "hello",
            "v": 1,
            "token": mint_token(self.user),
            "rooms": self.rooms,
        }
        if resume:
            hello["resume_seq"] = self.max_seq
        await self.ws.send(json.dumps(hello))
        welcome = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        if welcome.get("type") != "welcome":
            raise ClientDied(f"{self.user}: expected welcome, got {welcome}")
        if self.first_seq is None:
            self.first_seq = int(welcome["seq"])
            self.max_seq = max(self.max_seq, self.first_seq)
        self._alive.set()
        self._reader = asyncio.create_task(self._read(self.ws))
        return welcome

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                self._on_frame(json.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            self.close_codes.append(ws.close_code)
            if self.ws is ws:
                self._alive.clear()

    def _on_frame(self, frame: dict[str, Any]) -> None:
        if self.keep_frames:
            self.frames.append(frame)
        kind = frame.get("type")
        if kind == "message":
            if "room" in frame:
                key = f"room:{frame['room']}"
            else:
                peer = frame["to"] if frame["sender"] == self.user else frame["sender"]
                key = f"dm:{peer}"
            self.seen[key].append((int(frame["seq"]), frame["id"]))
            self.max_seq = max(self.max_seq, int(frame["seq"]))
        elif kind == "ack":
            self.acks[frame["client_id"]] = (frame["id"], int(frame["seq"]))
            self.unacked.pop(frame["client_id"], None)
        elif kind == "error":
            self.errors.append(frame)
        elif kind == "resumed":
            self.resumed.append(frame)

    async def send_json(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(frame))

    def next_client_id(self) -> str:
        return f"{self.user}-{next(self._counter)}"

    async def post(self, frame: dict[str, Any]) -> None:
        """Send a `send` or `dm` frame and remember it until acked (re-sent on reconnect)."""
        self.unacked[frame["client_id"]] = frame
        if self.connected:
            with contextlib.suppress(ConnectionClosed):
                await self.send_json(frame)

    async def resend_unacked(self) -> None:
        for frame in list(self.unacked.values()):
            if not self.connected:
                return
            with contextlib.suppress(ConnectionClosed):
                await self.send_json(frame)

    async def reconnect(self, timeout: float = 30.0) -> None:
        """Back to any live gateway with resume_seq; retries until one says welcome."""
        deadline = time.monotonic() + timeout
        while True:
            self._url_index += 1
            try:
                await self.connect(resume=True)
                self.reconnects += 1
                await self.resend_unacked()
                return
            except (OSError, ConnectionClosed, ClientDied, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def supervise(self) -> None:
        """Reconnect whenever the socket dies, until `close()`."""
        while not self._stopping:
            if not self.connected:
                await self.reconnect()
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        self._stopping = True
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader

    def recheck_errors(self) -> None:
        """send_failed / rate_limited are answers to retry; retry them with the same id."""
        for err in self.errors:
            ref = err.get("ref")
            if err.get("code") in ("send_failed", "rate_limited") and ref in self.unacked:
                err["retry"] = True


def ordering_problems(
    client: ScoringClient, log: list[LoggedMessage], thread_keys: Iterable[str]
) -> list[str]:
    """What differs between what `client` saw per thread and the CHAT log (empty: exact)."""
    expected: dict[str, list[tuple[int, str]]] = defaultdict(list)
    base = client.first_seq or 0
    for m in log:
        key = thread_key_of_subject(m.subject, client.user)
        if key is not None and m.seq > base:
            expected[key].append((m.seq, m.id))
    problems = []
    for key in thread_keys:
        got, want = client.seen.get(key, []), expected.get(key, [])
        if got == want:
            continue
        got_set, want_set = set(got), set(want)
        dups = [x for x, n in Counter(got).items() if n > 1]
        missing = sorted(want_set - got_set)
        extra = sorted(got_set - want_set)
        out_of_order = [got[i] for i in range(1, len(got)) if got[i][0] <= got[i - 1][0]]
        problems.append(
            f"{client.user} {key}: {len(got)} seen vs {len(want)} logged; "
            f"missing {missing[:5]} ({len(missing)}), dup {dups[:5]} ({len(dups)}), "
            f"extra {extra[:5]} ({len(extra)}), out of order {out_of_order[:5]} "
            f"({len(out_of_order)}); reconnects {client.reconnects}, resumed {client.resumed}"
        )
    return problems


@dataclass
class GrpcReader:
    """A gRPC StreamMessages client (services/rpc) that resumes after every end, on any
    live rpc replica, from the last seq it received; `ends` lists why each stream ended."""

    addresses: Callable[[], list[str]]
    rooms: list[str]
    user: str = "grpc-reader"
    seqs: list[int] = field(default_factory=list)
    ends: list[str] = field(default_factory=list)
    current: str = ""  # the address of the replica streaming now

    async def run(self) -> None:
        metadata = (("authorization", f"Bearer {mint_token(self.user)}"),)
        while True:
            addresses = self.addresses()
            if not addresses:
                await asyncio.sleep(0.1)
                continue
            since = self.seqs[-1] if self.seqs else 0
            request = pb.StreamRequest(rooms=self.rooms, since_seq=since)
            self.current = addresses[len(self.ends) % len(addresses)]
            async with grpc.aio.insecure_channel(self.current) as ch:
                call = ch.unary_stream(
                    "/chat.v1.ChatService/StreamMessages",
                    request_serializer=bytes,
                    response_deserializer=pb.StreamItem.FromString,
                )
                try:
                    async for item in call(request, metadata=metadata):
                        self.seqs.append(item.seq)
                except grpc.aio.AioRpcError as exc:
                    self.ends.append(exc.code().name)
            await asyncio.sleep(0.2)


# --- one whole system on its own NATS server -------------------------------------------


@dataclass
class SystemRun:
    """A running system: its own NATS server (so tests may restart it), a fresh database
    on the session's Postgres, the service processes, and a NATS client for checks."""

    nats: NatsServer
    database_url: str
    system: ChatSystem
    nc: NATS

    def ws_url(self, index: int = 0) -> str:
        return self.system.gateway_ws_urls()[index]


async def create_database(admin_url: str) -> str:
    name = f"sys_{int(time.time() * 1000) % 10**9}_{free_port()}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"


async def drop_database(admin_url: str, url: str) -> None:
    admin = await asyncpg.connect(admin_url)
    with contextlib.suppress(Exception):
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    await admin.close()


@contextlib.asynccontextmanager
async def system_run(
    base: Path, pg_admin_url: str, **system_options: Any
) -> Any:  # AsyncIterator[SystemRun]
    nats_server = await asyncio.to_thread(NatsServer.deployed(base / "nats").start)
    database_url = await create_database(pg_admin_url)
    system = ChatSystem([nats_server.url], database_url, base / "logs", **system_options)
    nc: NATS | None = None
    try:
        await asyncio.to_thread(system.start)
        nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        yield SystemRun(nats_server, database_url, system, nc)
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await asyncio.to_thread(system.stop)
        await asyncio.to_thread(nats_server.stop)
        await drop_database(pg_admin_url, database_url)
