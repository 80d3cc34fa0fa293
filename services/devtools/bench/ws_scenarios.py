"""Scenarios driven through WebSockets: fan-out, latency, durable send, connections.

Each runs the same load twice in one `make bench`: against the bare baseline
(devtools.bench.baseline) and against the real system, so the ratio is meaningful even
when the machine's absolute speed drifts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devtools.bench import loadgen
from devtools.bench.cluster import Cluster, Proc, cpu_of, mint_token, nats_proc, service_exists
from devtools.bench.loadgen import Conn, Fleet, Plan
from devtools.bench.report import Figure, Run, percentile
from devtools.bench.sampler import CpuSampler

Target = tuple[str, int]  # host, port
TokenFn = Callable[[str], str]


@dataclass
class Ctx:
    """What every scenario gets: scale, where to write, how to reach a deployed system."""

    full: bool
    workdir: Any
    gateway_urls: list[Target]  # empty: start our own
    token_fn: TokenFn = mint_token
    workers: int = 2

    def scaled(self, full: int, small: int) -> int:
        return full if self.full else small


def _split(items: list[Conn], parts: int) -> list[list[Conn]]:
    return [items[i::parts] for i in range(parts)]


def _measure_cpu(procs: list[Proc]) -> Callable[[], dict[str, float]]:
    before = cpu_of(procs)
    t0 = time.monotonic()

    def done() -> dict[str, float]:
        after = cpu_of(procs)
        elapsed = max(time.monotonic() - t0, 1e-6)
        # Share of one core each process used during the run.
        return {k: round((after[k] - before.get(k, 0.0)) / elapsed, 3) for k in after}

    return done


def _loadgen_cpu(results: list[dict[str, Any]], elapsed: float) -> float:
    return round(sum(r["run_cpu_seconds"] for r in results) / max(elapsed, 1e-6), 3)


def _system_procs(cluster: Cluster) -> list[Proc]:
    procs = [p for _, p in cluster.services] + [p for _, p in cluster.baselines]
    nats = nats_proc(cluster)
    return procs + ([nats] if nats else [])


def _gateways(ctx: Ctx, cluster: Cluster, count: int, presence: bool = True) -> list[Target]:
    if ctx.gateway_urls:
        return (
            ctx.gateway_urls[:count] if len(ctx.gateway_urls) >= count else ctx.gateway_urls * count
        )
    if presence and service_exists("presence"):
        cluster.presence()
    return [("127.0.0.1", cluster.gateway(f"bench-gw-{i + 1}")[1].port) for i in range(count)]


# --- 1. fan-out ------------------------------------------------------------------------
def _fanout_once(
    ctx: Ctx, cluster: Cluster, targets: list[Target], clients: int, copies: int, tag: str
) -> dict[str, Any]:
    duration = ctx.scaled(15, 4)
    room = "fan"
    senders = [
        Conn(h, p, ctx.token_fn(f"{tag}-sender-{i}"), [room], role="send", room=room)
        for i, (h, p) in enumerate(targets)
    ]
    receivers = [
        Conn(*targets[i % len(targets)], ctx.token_fn(f"{tag}-u{i}"), [room])
        for i in range(clients)
    ]
    receiver_workers = list(range(1, ctx.workers + 1))
    params = {
        "duration": duration,
        "window": min(200, max(20, 20000 // clients)),
        "copies": copies,
        "own_slot": 0,
        "receiver_workers": receiver_workers,
    }
    plans = [Plan("fanout", senders, params)] + [
        Plan("fanout", part, {"concurrency": 100}) for part in _split(receivers, ctx.workers)
    ]
    fleet = Fleet(plans)
    try:
        fleet.start()
        time.sleep(ctx.scaled(5, 2))  # let the join-time presence storm drain first
        cpu = _measure_cpu(_system_procs(cluster))
        t0 = fleet.release()
        deadline = t0 + duration + 20
        time.sleep(duration)
        while time.monotonic() < deadline:
            sent = fleet.progress[0]
            if fleet.min_progress(receiver_workers) >= sent:
                break
            time.sleep(0.05)
        results = fleet.finish()
        elapsed = time.monotonic() - t0
        server_cpu = cpu()
    finally:
        fleet.terminate()
    recv = results[1:]
    sent = results[0]["sent"]
    total = sum(sum(r["received"]) for r in recv)
    timeline = _merge([r["timeline"] for r in recv])
    active = max(len(timeline) * loadgen.BUCKET, 1e-6)
    by_port: dict[int, int] = {}
    for r in recv:
        for port, n in r["received_by_port"].items():
            by_port[port] = by_port.get(port, 0) + n
    return {
        "sent": sent,
        "frames": total,
        "frames_per_s": total / active,
        "per_process_per_s": {str(p): n / active for p, n in by_port.items()},
        "lost": sent * clients - total,
        "closed_by_server": sum(r["closed_by_server"] for r in recv),
        "timeline": [c / loadgen.BUCKET for c in timeline],
        "loadgen_cpu": _loadgen_cpu(results, elapsed),
        "server_cpu": server_cpu,
    }


def fanout(ctx: Ctx) -> Run:
    clients = ctx.scaled(1000, 100)
    with Cluster(ctx.workdir / "fanout-baseline") as c:
        base = _fanout_once(
            ctx, c, [("127.0.0.1", c.baseline().port) for _ in range(2)], clients, 2, "b"
        )
    with Cluster(ctx.workdir / "fanout") as c:
        gw = _fanout_once(ctx, c, _gateways(ctx, c, 2), clients, 1, "f")
    ratios = [
        g / b
        for g, b in zip(
            sorted(gw["per_process_per_s"].values()),
            sorted(base["per_process_per_s"].values()),
            strict=False,
        )
    ]
    worst = min(ratios) if ratios else 0.0
    figs = [
        Figure(
            f"fan-out frames/s ({clients} clients, 1 room, 2 gateways)",
            gw["frames_per_s"],
            "frames/s",
            baseline=base["frames_per_s"],
            target="ratio >= 0.6 per gateway process",
            passed=worst >= 0.6 and gw["lost"] == 0,
            ratio=worst,
        ),
        Figure(
            "fan-out frames lost",
            gw["lost"],
            "frames",
            baseline=base["lost"],
            target="0",
            passed=gw["lost"] == 0,
        ),
    ]
    return Run("fanout", figs, {"gateway": gw, "baseline": base, "per_process_ratio": ratios})


def _merge(timelines: list[list[int]]) -> list[int]:
    out = [0] * max((len(t) for t in timelines), default=0)
    for t in timelines:
        for i, v in enumerate(t):
            out[i] += v
    return out


# --- 2. latency ------------------------------------------------------------------------
def _latency_once(
    ctx: Ctx, cluster: Cluster, a: Target, b: Target, clients: int, rate: float, tag: str
) -> dict[str, Any]:
    duration = ctx.scaled(20, 5)
    pairs = clients // 2
    conns: list[Conn] = []
    for i in range(pairs):
        room = f"lat{i}"
        conns.append(Conn(*a, ctx.token_fn(f"{tag}-s{i}"), [room], role="send", room=room))
        conns.append(Conn(*b, ctx.token_fn(f"{tag}-r{i}"), [room]))
    # Keep each pair in one worker, so a worker's senders and receivers match up.
    parts: list[list[Conn]] = [[] for _ in range(ctx.workers)]
    for i in range(pairs):
        parts[i % ctx.workers] += conns[2 * i : 2 * i + 2]
    plans = [
        Plan("latency", part, {"rate": rate / ctx.workers, "concurrency": 100}) for part in parts
    ]
    fleet = Fleet(plans)
    try:
        fleet.start()
        time.sleep(ctx.scaled(4, 2))
        procs = _system_procs(cluster)
        cpu = _measure_cpu(procs)
        pids = {p.name: p.pid for p in procs}
        pids.update({f"loadgen-{i + 1}": pid for i, pid in enumerate(fleet.pids())})
        sampler = CpuSampler(pids).start()
        t0 = fleet.release()
        began = time.time()
        time.sleep(duration)
        results = fleet.finish()
        elapsed = time.monotonic() - t0
        server_cpu = cpu()
        per_second = sampler.stop()
    finally:
        fleet.terminate()
    lat_ms = sorted(x * 1000 for r in results for x in r["latencies"])
    sent = sum(r["sent"] for r in results)
    per_second["latency_p99_ms"] = _p99_per_second(results, began)
    # CPU per delivered message, per process: what 1,000 msg/s costs in cores whatever
    # else the machine does (a rate or a tail moves with the others' load; this hardly).
    cpu_s = {k: v * elapsed for k, v in server_cpu.items()}
    cpu_s["loadgen"] = sum(r["run_cpu_seconds"] for r in results)
    cpu_us = {k: round(v / max(len(lat_ms), 1) * 1e6, 1) for k, v in cpu_s.items()}
    return {
        "sent": sent,
        "rate": sent / elapsed,
        "received": len(lat_ms),
        "p50_ms": percentile(lat_ms, 50),
        "p99_ms": percentile(lat_ms, 99),
        "p999_ms": percentile(lat_ms, 99.9),
        "max_ms": lat_ms[-1] if lat_ms else 0.0,
        "latencies_ms": lat_ms,
        "loadgen_cpu": _loadgen_cpu(results, elapsed),
        "server_cpu": server_cpu,
        "per_second": per_second,
        "cpu_us_per_msg": cpu_us,
        "others_cores": _mean(per_second["others"]),
    }


def _p99_per_second(results: list[dict[str, Any]], began: float) -> list[float]:
    """p99 of the messages sent in each second of the run: lines up with the sampler's
    CPU seconds, so a tail can be matched with what ran at that moment."""
    buckets: dict[int, list[float]] = {}
    for r in results:
        for at, lat in zip(r.get("latency_sent_at", []), r["latencies"], strict=False):
            buckets.setdefault(int(at - began), []).append(lat * 1000)
    last = max(buckets, default=-1)
    return [round(percentile(sorted(buckets.get(i, [])), 99), 2) for i in range(last + 1)]


def latency(ctx: Ctx) -> Run:
    clients = ctx.scaled(500, 100)
    rate = float(ctx.scaled(1000, 200))
    with Cluster(ctx.workdir / "latency-baseline") as c:
        port = c.baseline().port
        base = _latency_once(ctx, c, ("127.0.0.1", port), ("127.0.0.1", port), clients, rate, "b")
    with Cluster(ctx.workdir / "latency") as c:
        a, b = _gateways(ctx, c, 2)
        gw = _latency_once(ctx, c, a, b, clients, rate, "l")
    label = f"A->B latency at {rate:.0f} msg/s, {clients} clients"
    figs = [
        Figure(f"{label}: p50", gw["p50_ms"], "ms", baseline=base["p50_ms"]),
        Figure(
            f"{label}: p99",
            gw["p99_ms"],
            "ms",
            baseline=base["p99_ms"],
            target="<= 10 ms",
            passed=gw["p99_ms"] <= 10,
        ),
        Figure(
            f"{label}: p99.9",
            gw["p999_ms"],
            "ms",
            baseline=base["p999_ms"],
            target="<= 25 ms",
            passed=gw["p999_ms"] <= 25,
        ),
        Figure(
            "latency: CPU per message, all processes (loadgen, gateways, NATS)",
            sum(gw["cpu_us_per_msg"].values()),
            "us",
            baseline=sum(base["cpu_us_per_msg"].values()),
        ),
        Figure(
            "latency run: other processes' load (not the bench's), mean",
            gw["others_cores"],
            "cores",
            baseline=base["others_cores"],
        ),
        Figure(
            "latency run: messages received / sent",
            gw["received"],
            "msgs",
            baseline=gw["sent"],
            target="all",
            passed=gw["received"] >= gw["sent"],
        ),
    ]
    return Run("latency", figs, {"gateway": gw, "baseline": base})


# --- 3. durable send --------------------------------------------------------------------
def _durable_once(
    ctx: Ctx, cluster: Cluster, target: Target, senders: int, tag: str, retry: bool = False
) -> dict[str, Any]:
    duration = ctx.scaled(15, 4)
    conns = [
        Conn(*target, ctx.token_fn(f"{tag}-d{i}"), [f"dur{i}"], role="send", room=f"dur{i}")
        for i in range(senders)
    ]
    plans = [
        Plan("durable", part, {"window": 4, "concurrency": 100, "retry": retry})
        for part in _split(conns, ctx.workers)
    ]
    fleet = Fleet(plans)
    try:
        fleet.start()
        time.sleep(1)
        cpu = _measure_cpu(_system_procs(cluster))
        t0 = fleet.release()
        time.sleep(duration)
        results = fleet.finish()
        elapsed = time.monotonic() - t0
        server_cpu = cpu()
    finally:
        fleet.terminate()
    acks = sum(r["acks"] for r in results)
    timeline = _merge([r["ack_timeline"] for r in results])
    return {
        "acks": acks,
        "send_errors": sum(r.get("send_errors", 0) for r in results),
        "acks_per_s": acks / elapsed,
        "timeline": [c / loadgen.BUCKET for c in timeline],
        "loadgen_cpu": _loadgen_cpu(results, elapsed),
        "server_cpu": server_cpu,
    }


# The gateway with the idempotency check (request hash on every publish, compared with
# the stored one on every duplicate) switched off: only to measure what the check costs.
_NO_IDEMPOTENCY_CHECK = {"GATEWAY_IDEMPOTENCY_CHECK": "false"}


def _request_hash_us() -> float:
    """Microseconds the gateway spends per send on the request hash (in this process)."""
    from chatlib import idempotency
    from chatlib.proto.chat import v1 as pb

    msg = pb.ChatMessage(room="dur1", content="t=0", sender="d-d1", client_id="0" * 16)
    n = 100_000
    t0 = time.perf_counter()
    for _ in range(n):
        idempotency.fingerprint(msg)
    return (time.perf_counter() - t0) / n * 1e6


def durable(ctx: Ctx) -> Run:
    senders = ctx.scaled(200, 50)
    with Cluster(ctx.workdir / "durable-baseline") as c:
        base = _durable_once(ctx, c, ("127.0.0.1", c.baseline().port), senders, "b")
    with Cluster(ctx.workdir / "durable") as c:
        gw = _durable_once(ctx, c, _gateways(ctx, c, 1)[0], senders, "d")
    figs = [
        Figure(
            f"durable send: acked msgs/s ({senders} senders, 1 gateway)",
            gw["acks_per_s"],
            "msg/s",
            baseline=base["acks_per_s"],
            target=">= 0.5 x bare",
            passed=gw["acks_per_s"] >= 0.5 * base["acks_per_s"],
        ),
        Figure(
            "durable sends refused (error frames)",
            gw["send_errors"],
            "",
            target="0",
            passed=gw["send_errors"] == 0,
        ),
    ]
    details: dict[str, Any] = {"gateway": gw, "baseline": base}
    if not ctx.gateway_urls:  # the check's cost needs gateways we start ourselves
        cost = _idempotency_cost(ctx, senders)
        details["idempotency"] = cost
        figs += [
            Figure(
                "durable send with the idempotency check (baseline: check off, ABBA runs)",
                cost["fresh"]["on"],
                "msg/s",
                baseline=cost["fresh"]["off"],
            ),
            Figure(
                "durable send, each message twice (half replays), check (baseline: off)",
                cost["retry"]["on"],
                "acks/s",
                baseline=cost["retry"]["off"],
            ),
            Figure(
                "gateway CPU per acked send with the check (baseline: off)",
                cost["fresh"]["cpu_us_on"],
                "us",
                baseline=cost["fresh"]["cpu_us_off"],
            ),
            Figure(
                "gateway CPU per ack, half replays, with the check (baseline: off)",
                cost["retry"]["cpu_us_on"],
                "us",
                baseline=cost["retry"]["cpu_us_off"],
            ),
            Figure("request hash per send (in-process)", _request_hash_us(), "us"),
        ]
    return Run("durable", figs, details)


def _idempotency_cost(ctx: Ctx, senders: int) -> dict[str, Any]:
    """Acked msgs/s with the idempotency check on and off: two gateways on one NATS, one
    of them with the check off, loaded in turn in the order on, off, off, on (a drift of
    the shared machine or of the growing stream then weighs on both alike), for fresh
    sends and for retries (each send twice: every second one takes the duplicate path,
    get_msg + compare). Each figure is the mean of its two runs."""
    out: dict[str, Any] = {}
    with Cluster(ctx.workdir / "durable-idempotency") as c:
        on = _gateways(ctx, c, 1)[0]
        off = ("127.0.0.1", c.gateway("bench-gw-nocheck", _NO_IDEMPOTENCY_CHECK)[1].port)
        proc_of = {p.port: p.name for _, p in c.services}
        for load, retry in (("fresh", False), ("retry", True)):
            rates: dict[str, list[float]] = {"on": [], "off": []}
            cpu_us: dict[str, list[float]] = {"on": [], "off": []}
            for i, check in enumerate(("on", "off", "off", "on")):
                target = on if check == "on" else off
                tag = f"{load[0]}{check}{i}"
                result = _durable_once(ctx, c, target, senders, tag, retry)
                rates[check].append(result["acks_per_s"])
                # The loaded gateway's CPU per ack: steadier than a rate on a shared machine.
                share = result["server_cpu"].get(proc_of[target[1]], 0.0)
                cpu_us[check].append(share / max(result["acks_per_s"], 1e-9) * 1e6)
            out[load] = {
                "on": _mean(rates["on"]),
                "off": _mean(rates["off"]),
                "cpu_us_on": _mean(cpu_us["on"]),
                "cpu_us_off": _mean(cpu_us["off"]),
                "runs": rates,
                "cpu_us_runs": cpu_us,
            }
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# --- 6. connections ---------------------------------------------------------------------
ROOMS_TOTAL = 200  # each user is in the lobby plus 2 of these


def _rooms_of(i: int) -> list[str]:
    first = i % ROOMS_TOTAL
    return [f"r{first}", f"r{(first + 1 + (i // ROOMS_TOTAL) % (ROOMS_TOTAL - 1)) % ROOMS_TOTAL}"]


def _connections_once(
    ctx: Ctx,
    cluster: Cluster,
    target: Target,
    server: Proc | None,
    count: int,
    tag: str,
    with_rooms: bool = False,
) -> dict[str, Any]:
    conns = [
        Conn(*target, ctx.token_fn(f"{tag}{i}"), _rooms_of(i) if with_rooms else [])
        for i in range(count)
    ]
    params = {"concurrency": 200, "count_presence": True}
    plans = [Plan("idle", part, params) for part in _split(conns, ctx.workers)]
    rss0 = server.rss() if server else 0
    fleet = Fleet(plans)
    procs = _system_procs(cluster) if server else []
    cpu = _measure_cpu(procs) if server else None
    # CPU seconds per process over connecting plus the presence traffic that followed:
    # per handshake, a figure much less sensitive to the machine's other load than a rate.
    cpu0 = cpu_of(procs)
    try:
        fleet.start(timeout=600)
        # The join-time presence traffic is over when no presence frame arrived for 2 s.
        last, still_since = -1, time.monotonic()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and time.monotonic() - still_since < 2:
            total = sum(fleet.progress[i] for i in range(len(plans)))
            if total != last:
                last, still_since = total, time.monotonic()
            time.sleep(0.1)
        server_cpu = cpu() if cpu else {}
        cpu1 = cpu_of(procs)
        rss1 = server.rss() if server else 0
        fleet.release()
        results = fleet.finish()
    finally:
        fleet.terminate()
    seconds = max(fleet.ready[i]["connect_seconds"] for i in fleet.ready)
    hs = sorted(x * 1000 for r in results for x in r["handshakes"])
    online = sorted(n for r in results for n in r["welcome_online"])
    presence = sum(r["presence_frames"] for r in results)
    changes = sum(r.get("presence_changes", 0) for r in results)
    cpu_ms = {k: round((cpu1[k] - cpu0.get(k, 0.0)) * 1000 / count, 3) for k in cpu1}
    return {
        "connections": count,
        "rss_before": rss0,
        "rss_after": rss1,
        "kib_per_conn": (rss1 - rss0) / 1024 / count,
        "handshakes_per_s": count / seconds,
        "handshake_p50_ms": percentile(hs, 50),
        "handshake_p99_ms": percentile(hs, 99),
        "presence_frames": presence,
        "presence_frames_per_join": presence / count,
        # Users' changes those frames carried (more than frames when batched).
        "presence_changes_per_join": changes / count,
        "cpu_ms_per_handshake": cpu_ms,
        "server_cpu_ms_per_handshake": cpu_ms.get(server.name, 0.0) if server else 0.0,
        "welcome_online_max": online[-1] if online else 0,
        "welcome_online_p50": percentile([float(n) for n in online], 50) if online else 0,
        # Share of one core over connecting plus the presence traffic that followed.
        "server_cpu": server_cpu.get(server.name, 0.0) if server else 0.0,
        "cpu": server_cpu,
        "connect_seconds": seconds,
    }


def connections(ctx: Ctx) -> Run:
    count = ctx.scaled(10000, 1000)
    with Cluster(ctx.workdir / "conn-baseline") as c:
        b = c.baseline()
        base = _connections_once(ctx, c, ("127.0.0.1", b.port), b, count, "b")
    plain: dict[str, Any] = {}
    if not ctx.gateway_urls:
        # The same gateway without presence and without rooms (what this scenario measured
        # before presence was scoped): the cost of presence, on the same machine and run.
        with Cluster(ctx.workdir / "conn-plain") as c:
            _, bare = c.gateway("bench-plain")
            plain = _connections_once(ctx, c, ("127.0.0.1", bare.port), bare, count, "p")
    with Cluster(ctx.workdir / "conn") as c:
        # With presence: every user is in the lobby plus 2 of 200 rooms. Presence is
        # scoped (gateway/scope.py): a user's online event goes to the local members of
        # their small rooms, the lobby (big) does not push, so frames per join stay about
        # the size of two rooms instead of the number of users online.
        if ctx.gateway_urls:
            target, proc = ctx.gateway_urls[0], None
        else:
            if service_exists("presence"):
                c.presence()
            _, proc = c.gateway("bench-conn")
            target = ("127.0.0.1", proc.port)
        gw = _connections_once(ctx, c, target, proc, count, "c", with_rooms=True)
    ratio = gw["handshakes_per_s"] / max(base["handshakes_per_s"], 1e-6)
    figs = [
        Figure(
            f"memory per idle connection ({count} on 1 gateway)",
            gw["kib_per_conn"],
            "KiB",
            baseline=base["kib_per_conn"],
            target="<= 30 KiB",
            passed=gw["kib_per_conn"] <= 30,
        ),
        Figure(
            "handshakes/s (upgrade + hello + welcome)",
            gw["handshakes_per_s"],
            "/s",
            baseline=base["handshakes_per_s"],
            target=">= 0.9 x baseline",
            passed=ratio >= 0.9,
        ),
        Figure(
            "presence frames per join (lobby + 2 of 200 rooms)",
            gw["presence_frames_per_join"],
            "frames",
            target=f"<< {count} (scoped)",
            passed=gw["presence_frames_per_join"] < count / 10,
        ),
        Figure(
            "presence changes per join (carried by those frames)",
            gw["presence_changes_per_join"],
            "changes",
        ),
        Figure("gateway CPU while connecting", gw["server_cpu"] * 100, "% of a core"),
        Figure(
            "gateway CPU per handshake (+ the presence traffic after)",
            gw["server_cpu_ms_per_handshake"],
            "ms",
            baseline=base["server_cpu_ms_per_handshake"],
        ),
    ]
    if plain:
        figs.insert(
            2,
            Figure(
                "handshakes/s with presence + rooms vs without (same gateway)",
                gw["handshakes_per_s"],
                "/s",
                baseline=plain["handshakes_per_s"],
            ),
        )
        figs.append(
            Figure(
                "gateway CPU per handshake with presence + rooms vs without",
                gw["server_cpu_ms_per_handshake"],
                "ms",
                baseline=plain["server_cpu_ms_per_handshake"],
            )
        )
    return Run("connections", figs, {"gateway": gw, "baseline": base, "without_presence": plain})
