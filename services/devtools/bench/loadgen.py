"""Load-generator worker processes: many raw WebSocket clients per process.

The coordinator (`Fleet`) starts workers with a plan, waits until every worker reports
its sockets open and greeted, then releases them all at once (`go`) and later `stop`s
them. Workers share one progress slot each (the fewest messages any of their receivers
has seen) so a sender can keep a bounded number of messages in flight without ever
outrunning the slowest receiver. Each worker reports its own CPU time.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop

from devtools.bench import cluster, wsclient

MESSAGE_MARK = b'"type":"message"'
ACK_MARK = b'"type":"ack"'
# An error answering a send (it names the send in "ref"): that send is over, unacked.
SEND_ERROR_MARK = b'"type":"error"'
PRESENCE_MARK = b'"type":"presence"'
BATCH_MARK = b'"type":"presence_batch"'
BUCKET = 0.1  # seconds per throughput-timeline bucket
# How long receivers may take, after the senders stop, to get what was still in flight.
LATENCY_GRACE = 2.0


@dataclass
class Conn:
    host: str
    port: int
    token: str
    rooms: list[str]
    role: str = "recv"  # recv | send
    room: str = ""  # where a sender sends
    path: str = "/ws"


@dataclass
class Plan:
    mode: str  # fanout | latency | durable | idle | storm_recv | storm_send
    conns: list[Conn]
    params: dict[str, Any] = field(default_factory=dict)


class Client:
    """One socket's counters; `on_text` is the hot path, kept to a few byte checks."""

    __slots__ = (
        "acks",
        "closes",
        "conn",
        "latencies",
        "latency_sent_at",
        "messages",
        "parse",
        "presence",
        "presence_changes",
        "send_errors",
        "spec",
        "welcome_online",
        "welcomed",
    )

    def __init__(self, spec: Conn, parse_latency: bool) -> None:
        self.spec = spec
        self.conn: wsclient.WsConnection | None = None
        self.messages = 0
        self.acks = 0
        self.send_errors = 0
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.latencies: list[float] = []
        self.latency_sent_at: list[float] = []  # send time of each latency, for a timeline
        self.parse = parse_latency
        self.closes = 0
        self.presence = 0  # presence frames received (presence and presence_batch)
        self.presence_changes = 0  # users' changes they carried
        self.welcome_online = 0  # names in welcome.online

    def on_text(self, data: bytes) -> None:
        if MESSAGE_MARK in data:
            self.messages += 1
            _TIMELINE.add(1)
            if self.parse:
                frame = orjson.loads(data)
                sent = frame.get("content", "")
                if sent.startswith("t="):
                    at = float(sent[2:])
                    self.latencies.append(time.time() - at)
                    self.latency_sent_at.append(at)
        elif ACK_MARK in data:
            self.acks += 1
            _ACKS.add(1)
        elif SEND_ERROR_MARK in data and b'"ref"' in data:
            self.send_errors += 1
        elif PRESENCE_MARK in data:
            self.presence += 1
            self.presence_changes += 1
        elif BATCH_MARK in data:
            frame = orjson.loads(data)
            self.presence += 1
            self.presence_changes += len(frame["online"]) + len(frame["offline"])
        elif not self.welcomed.done() and b'"welcome"' in data:
            self.welcome_online = len(orjson.loads(data).get("online") or ())
            self.welcomed.set_result(None)
        elif not self.welcomed.done() and b'"unauthorized"' in data:
            self.welcomed.set_exception(RuntimeError(data.decode(errors="replace")))


class Timeline:
    """Counts per BUCKET since `start`, cheap enough to call per frame."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.counts: list[int] = []
        self.total = 0

    def reset(self) -> None:
        self.start = time.monotonic()
        self.counts = []

    def add(self, n: int) -> None:
        self.total += n
        i = int((time.monotonic() - self.start) / BUCKET)
        counts = self.counts
        if i >= len(counts):
            counts.extend([0] * (i + 1 - len(counts)))
        counts[i] += n


_TIMELINE = Timeline()
_ACKS = Timeline()


async def open_clients(
    plan: Plan, parse_latency: bool, concurrency: int, opened: list[Client] | None = None
) -> tuple[list[Client], list[float]]:
    """Connect and greet every socket; returns the clients and each handshake's seconds."""
    limit = asyncio.Semaphore(concurrency)
    durations: list[float] = []

    async def one(spec: Conn) -> Client:
        client = Client(spec, parse_latency and spec.role == "recv")
        if opened is not None:
            opened.append(client)
        async with limit:
            began = time.monotonic()
            for attempt in range(5):
                try:
                    client.conn = await wsclient.connect(
                        spec.host, spec.port, spec.path, client.on_text
                    )
                    break
                except (OSError, wsclient.HandshakeError, TimeoutError):
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
            # Like the page: presence changes come batched (one frame per interval).
            hello = {
                "type": "hello",
                "v": 1,
                "token": spec.token,
                "rooms": spec.rooms,
                "presence_batch": True,
            }
            assert client.conn is not None
            client.conn.send_text(orjson.dumps(hello))
            await asyncio.wait_for(client.welcomed, 60)
            durations.append(time.monotonic() - began)
        return client

    clients = await asyncio.gather(*(one(spec) for spec in plan.conns))
    return list(clients), durations


def worker_main(index: int, plan: Plan, progress: Any, go: Any, stop: Any, results: Any) -> None:
    if cluster.OWN_SESSIONS:
        # Its own CPU share under autogroup scheduling, like the services (cluster.py):
        # clients are other machines, not a slice of the bench's share. The Fleet still
        # stops it (terminate / kill by pid), a terminal's Ctrl-C reaches the bench.
        os.setsid()
    try:
        # uvloop, as the gateway runs on: on the stdlib loop the load generator took
        # ~0.9 of the machine's 2 cores in a storm, as much as the gateway it measures.
        data = uvloop.run(_worker(index, plan, progress, go, stop, results))
    except BaseException as exc:  # report, so the coordinator does not wait forever
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    times = os.times()
    data["cpu_seconds"] = times.user + times.system
    results.put(("result", index, data))


async def _wait_event(event: Any) -> None:
    # A multiprocessing.Event cannot be awaited; polling every 5 ms costs next to nothing.
    while not event.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0.005)


async def _worker(
    index: int, plan: Plan, progress: Any, go: Any, stop: Any, results: Any
) -> dict[str, Any]:
    params = plan.params
    if plan.mode in ("storm_recv", "storm_send"):
        from devtools.bench import storm

        run = storm.receiver_worker if plan.mode == "storm_recv" else storm.sender_worker
        return await run(index, plan, progress, go, stop)
    began = time.monotonic()
    opened: list[Client] = []
    counting = None
    if params.get("count_presence"):
        # Presence frames received so far, in this worker's progress slot (from the start:
        # the join-time presence traffic is what the connections scenario measures).
        counting = asyncio.create_task(_count_presence(index, opened, progress))
    clients, handshakes = await open_clients(
        plan, plan.mode == "latency", int(params.get("concurrency", 100)), opened
    )
    connect_seconds = time.monotonic() - began
    results.put(("ready", index, {"connect_seconds": connect_seconds}))
    await _wait_event(go)
    cpu0 = os.times()
    _TIMELINE.reset()
    _ACKS.reset()
    base_messages = [c.messages for c in clients]
    for c in clients:
        c.latencies.clear()
        c.latency_sent_at.clear()
    senders = [c for c in clients if c.spec.role == "send"]
    receivers = [c for c in clients if c.spec.role == "recv"]
    tasks: list[asyncio.Task[Any]] = []
    if receivers:
        tasks.append(
            asyncio.create_task(
                _report_progress(index, receivers, base_messages, clients, progress)
            )
        )
    sent = 0
    if senders and plan.mode == "fanout":
        tasks.append(asyncio.create_task(_send_windowed(senders, progress, params)))
    elif senders and plan.mode == "latency":
        tasks.append(asyncio.create_task(_send_paced(senders, params)))
    elif senders and plan.mode == "durable":
        tasks += [asyncio.create_task(_send_closed_loop(s, params)) for s in senders]
    await _wait_event(stop)
    for task in tasks:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    sent = sum(int(o) for o in outcomes if type(o) is int)
    if plan.mode == "latency":
        # Senders stop first; messages still in flight at that instant get a moment to
        # arrive, so "received < sent" means lost, not merely late.
        await _wait_received(clients, sent, LATENCY_GRACE)
    cpu1 = os.times()
    if counting is not None:
        counting.cancel()
    latencies = [lat for c in clients for lat in c.latencies]
    closed = sum(1 for c in clients if c.conn is not None and c.conn.closed.done())
    received = [c.messages - b for c, b in zip(clients, base_messages, strict=True)]
    recv_by_port: dict[int, int] = {}
    for c, n in zip(clients, received, strict=True):
        if c.spec.role == "recv":
            recv_by_port[c.spec.port] = recv_by_port.get(c.spec.port, 0) + n
    if not params.get("keep_open"):
        for c in clients:
            if c.conn is not None:
                c.conn.abort()
    return {
        "connect_seconds": connect_seconds,
        "handshakes": handshakes,
        "timeline": _TIMELINE.counts,
        "ack_timeline": _ACKS.counts,
        "acks": sum(c.acks for c in clients),
        "send_errors": sum(c.send_errors for c in clients),
        "received": received,
        "received_by_port": recv_by_port,
        "receivers": len(receivers),
        "latencies": latencies,
        "latency_sent_at": [at for c in clients for at in c.latency_sent_at],
        "closed_by_server": closed,
        "close_codes": sorted({c.conn.close_code for c in clients if c.conn and c.conn.close_code}),
        "sent": sent,
        "presence_frames": sum(c.presence for c in clients),
        "presence_changes": sum(c.presence_changes for c in clients),
        "welcome_online": [c.welcome_online for c in clients],
        "run_cpu_seconds": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }


async def _wait_received(clients: list[Client], sent: int, grace: float) -> None:
    deadline = time.monotonic() + grace
    while sum(len(c.latencies) for c in clients) < sent and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def _count_presence(index: int, clients: list[Client], progress: Any) -> None:
    while True:
        progress[index] = sum(c.presence for c in clients)
        await asyncio.sleep(0.05)


async def _report_progress(
    index: int, receivers: list[Client], base: list[int], clients: list[Client], progress: Any
) -> None:
    offset = {id(c): b for c, b in zip(clients, base, strict=True)}
    while True:
        if receivers:
            progress[index] = min(c.messages - offset[id(c)] for c in receivers)
        await asyncio.sleep(0.01)


async def _send_windowed(senders: list[Client], progress: Any, params: dict[str, Any]) -> int:
    """Fan-out: message k goes out once every receiver everywhere has seen k - window."""
    window = int(params.get("window", 20))
    per_message = int(params.get("copies", 1))  # baseline: one copy per server
    own = int(params["own_slot"])
    until = time.monotonic() + float(params["duration"])
    sent = 0
    slots = [int(i) for i in params["receiver_workers"]]
    try:
        while time.monotonic() < until:
            slowest = min(progress[i] for i in slots) if slots else sent
            if sent - slowest < window:
                content = f"t={time.time():.6f}".encode()
                targets = senders if per_message > 1 else [senders[sent % len(senders)]]
                for s in targets:
                    assert s.conn is not None
                    s.conn.send_text(_send_frame(s.spec.room, content))
                sent += 1
                progress[own] = sent
                if sent % 8 == 0:
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.001)
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        pass
    return sent


def _send_frame(room: str, content: bytes) -> bytes:
    cid = uuid.uuid4().hex[:16]
    return b'{"type":"send","room":"%s","content":"%s","client_id":"%s"}' % (
        room.encode(),
        content,
        cid.encode(),
    )


async def _send_paced(senders: list[Client], params: dict[str, Any]) -> int:
    """Latency: a steady total rate spread round-robin over this worker's senders."""
    rate = float(params["rate"])
    sent = 0
    start = time.monotonic()
    try:
        while True:
            due = int((time.monotonic() - start) * rate)
            while sent < due:
                s = senders[sent % len(senders)]
                assert s.conn is not None
                s.conn.send_text(_send_frame(s.spec.room, f"t={time.time():.6f}".encode()))
                sent += 1
            await asyncio.sleep(0.001)
    except asyncio.CancelledError:
        return sent


async def _send_closed_loop(sender: Client, params: dict[str, Any]) -> int:
    """Durable send: keep `window` sends in flight, the next one goes when an ack comes.
    With `retry`, each frame goes twice (same client_id, same request): every second
    send is a duplicate, acked as a replay."""
    window = int(params.get("window", 4))
    copies = 2 if params.get("retry") else 1
    sent = 0
    assert sender.conn is not None
    try:
        while True:
            # A send that failed (send_failed after a PubAck timeout) is over too: counting
            # only acks would shrink the window for good with each failure.
            while sent - sender.acks - sender.send_errors < window:
                frame = _send_frame(sender.spec.room, b"t=0")
                for _ in range(copies):
                    sender.conn.send_text(frame)
                sent += copies
            await asyncio.sleep(0.002)
    except asyncio.CancelledError:
        return sent


class Fleet:
    """Start worker processes, wait until all are connected, then run them together."""

    def __init__(self, plans: list[Plan]) -> None:
        ctx = mp.get_context("spawn")
        self.ctx = ctx
        self.plans = plans
        self.progress = ctx.Array("q", len(plans), lock=False)
        self.go = ctx.Event()
        self.stop_event = ctx.Event()
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=worker_main,
                args=(i, plan, self.progress, self.go, self.stop_event, self.results),
                daemon=True,
            )
            for i, plan in enumerate(plans)
        ]
        self.ready: dict[int, dict[str, Any]] = {}
        self.outcome: dict[int, dict[str, Any]] = {}

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait until every worker is connected; returns the seconds it took."""
        began = time.monotonic()
        for p in self.procs:
            p.start()
        while len(self.ready) < len(self.procs):
            kind, index, data = self.results.get(timeout=timeout)
            if kind == "error":
                self.terminate()
                raise RuntimeError(f"load worker {index}: {data}")
            if kind == "ready":
                self.ready[index] = data
        return time.monotonic() - began

    def release(self) -> float:
        self.go.set()
        return time.monotonic()

    def min_progress(self, workers: list[int] | None = None) -> int:
        slots = workers if workers is not None else range(len(self.procs))
        return min(self.progress[i] for i in slots)

    def finish(self, timeout: float = 120.0) -> list[dict[str, Any]]:
        self.stop_event.set()
        while len(self.outcome) < len(self.procs):
            kind, index, data = self.results.get(timeout=timeout)
            if kind == "error":
                self.terminate()
                raise RuntimeError(f"load worker {index}: {data}")
            if kind == "result":
                self.outcome[index] = data
        for p in self.procs:
            p.join(10)
        return [self.outcome[i] for i in range(len(self.procs))]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def terminate(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)
