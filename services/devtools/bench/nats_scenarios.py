"""Scenarios that talk NATS and Postgres directly: archive drain, history, presence."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import nats
import orjson
import psutil
from chatlib import codec, ids, names
from chatlib.proto.chat import v1 as pb

from devtools.bench import wsclient
from devtools.bench.cluster import Cluster, Missing, Proc, nats_proc, service_exists
from devtools.bench.report import Figure, Run, percentile
from devtools.bench.ws_scenarios import Ctx

COLUMNS = ["id", "room", "dm_lo", "dm_hi", "sender", "content", "ts_ms", "stream_seq"]


def _need(module: str) -> None:
    if not service_exists(module):
        raise Missing(f"services/{module} has no __main__ yet")


def _rows(count: int, rooms: int, start_ms: int) -> list[tuple[Any, ...]]:
    """`count` archive rows, ids in time order, spread round-robin over `rooms`."""
    return [
        (
            ids.new_id(start_ms + i // 10),
            f"hist{i % rooms}",
            None,
            None,
            f"u{i % 97}",
            f"message {i}",
            start_ms + i // 10,
            None,
        )
        for i in range(count)
    ]


# --- 4. archive --------------------------------------------------------------------------
async def _publish_tasks(nats_url: str, count: int) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        now = int(time.time() * 1000)
        for i in range(count):
            msg = pb.ChatMessage(
                id=ids.new_id(),
                room=f"arch{i % 50}",
                sender=f"u{i % 97}",
                content=f"task {i}",
                ts_ms=now,
            )
            payload, headers = codec.encode(pb.ArchiveTask(message=msg))
            headers[names.HEADER_MSG_ID] = msg.id
            # Core publish (the stream captures it) instead of one PubAck round trip each.
            await nc.publish(names.ARCHIVE_TASKS, payload, headers=headers)
            if i % 2000 == 1999:
                await nc.flush()
        await nc.flush()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = await js.stream_info(names.STREAM_ARCHIVE)
            if info.state.messages >= count:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"ARCHIVE holds {info.state.messages} of {count} tasks")
    finally:
        await nc.close()


async def _count(db_url: str, table: str = "messages") -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def _poll_count(
    db_url: str, target: int, timeout: float, cpu: Callable[[], dict[str, float]] | None = None
) -> tuple[list[tuple[float, int]], float, float, dict[str, float]]:
    """The row count over time, when the first row came and when the target was reached,
    and (with `cpu`) the CPU seconds each process spent between those two moments."""
    conn = await asyncpg.connect(db_url)
    series: list[tuple[float, int]] = []
    t0 = time.monotonic()
    first = done = 0.0
    cpu_first: dict[str, float] = {}
    spent: dict[str, float] = {}
    try:
        while time.monotonic() - t0 < timeout:
            n = int(await conn.fetchval("SELECT count(*) FROM messages"))
            now = time.monotonic() - t0
            series.append((round(now, 2), n))
            if n and not first:
                first = now
                cpu_first = cpu() if cpu else {}
            if n >= target:
                done = now
                if cpu:
                    spent = {k: v - cpu_first.get(k, 0.0) for k, v in cpu().items()}
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    return series, first, done, spent


async def _copy_baseline(db_url: str, rows: list[tuple[Any, ...]]) -> float:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_copy")
        await conn.execute("CREATE TABLE bench_copy (LIKE messages INCLUDING ALL)")
        t0 = time.monotonic()
        await conn.copy_records_to_table("bench_copy", records=rows, columns=COLUMNS)
        seconds = time.monotonic() - t0
        await conn.execute("DROP TABLE bench_copy")
        return len(rows) / seconds
    finally:
        await conn.close()


def _postgres_procs(c: Cluster) -> list[Proc]:
    if c.pg is None or c.pg.proc is None:
        return []
    return [Proc("postgres", c.pg.proc.pid, c.pg.port)]


def _cpu_tree(procs: list[Proc]) -> dict[str, float]:
    """CPU seconds of each process with its live children (Postgres backends)."""
    out: dict[str, float] = {}
    for p in procs:
        total = 0.0
        try:
            for one in [p.ps, *p.ps.children(recursive=True)]:
                try:
                    t = one.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        out[p.name] = total
    return out


def archive(ctx: Ctx) -> Run:
    _need("archive")
    count = ctx.scaled(100_000, 10_000)
    with Cluster(ctx.workdir / "archive") as c:
        db = c.start_postgres()
        # One replica first: it creates the schema and the streams; then it stops, so the
        # queue fills with nobody draining it.
        sp, _ = c.archive()
        c.stop_service(sp)
        t0 = time.monotonic()
        asyncio.run(_publish_tasks(c.start_nats(), count))
        publish_s = time.monotonic() - t0
        started = time.monotonic()
        replicas = [c.archive(wait=False)[1], c.archive(wait=False)[1]]
        watched = [*replicas, *_postgres_procs(c)]
        nats_server = nats_proc(c)
        if nats_server is not None:
            watched.append(nats_server)
        series, first, done, spent = asyncio.run(
            _poll_count(db, count, ctx.scaled(120, 60), lambda: _cpu_tree(watched))
        )
        time.sleep(1)  # a duplicate row would show up right after the count reached the target
        final = asyncio.run(_count(db))
        spawn_to_first = first
        rate = count / (done - first) if done and done > first else 0.0
        base_rate = asyncio.run(_copy_baseline(db, _rows(count, 50, int(time.time() * 1000))))
    del started
    drain_s = done - first if done else 0.0
    archive_cpu = sum(spent.get(p.name, 0.0) for p in replicas)
    figs = [
        Figure(
            f"archive drain rows/s ({count:,} tasks, 2 replicas)",
            rate,
            "rows/s",
            baseline=base_rate,
            target=">= 0.3 x COPY",
            passed=rate >= 0.3 * base_rate,
        ),
        Figure(
            "archive rows written",
            final,
            "rows",
            baseline=count,
            target=f"exactly {count:,}",
            passed=final == count,
        ),
    ]
    details = {
        "count_timeline": series,
        "publish_seconds": round(publish_s, 2),
        "seconds_to_first_row": round(spawn_to_first, 2),
        "drain_seconds": round(done - first, 2) if done else None,
        # CPU seconds from the first row to the last, per process (Postgres: postmaster
        # and its children alive at the end, i.e. the archive's pool backends).
        "server_cpu": {k: round(v, 2) for k, v in spent.items()},
        "archive_cpu_us_per_row": round(archive_cpu / count * 1e6, 1) if done else None,
        "archive_cores_busy": round(archive_cpu / drain_s, 2) if drain_s else None,
        "baseline": "COPY of the same number of rows into a copy of the table (Postgres ceiling)",
    }
    return Run("archive", figs, details)


# --- 5. history --------------------------------------------------------------------------
async def _history_bench(nats_url: str, db_url: str, total: int, queries: int) -> dict[str, Any]:
    rooms = 20
    rows = _rows(total, rooms, int(time.time() * 1000) - total)
    conn = await asyncpg.connect(db_url)
    try:
        t0 = time.monotonic()
        await conn.copy_records_to_table("messages", records=rows, columns=COLUMNS)
        await conn.execute("ANALYZE messages")
        load_s = time.monotonic() - t0
        room_ids = [r[0] for r in rows if r[1] == "hist0"]
        befores = [room_ids[random.randrange(100, len(room_ids))] for _ in range(queries)]
        nc = await nats.connect(nats_url)
        samples: dict[str, list[float]] = {
            "latest-50": [],
            "page-before": [],
            "sql latest-50": [],
            "sql page-before": [],
        }
        try:
            for label, before in (("latest-50", ""), ("page-before", None)):
                for i in range(queries):
                    req = pb.HistoryRequest(
                        room="hist0",
                        requester="bench",
                        limit=50,
                        before_id=before if before is not None else befores[i],
                    )
                    payload, headers = codec.encode(req)
                    s = time.perf_counter()
                    reply = await nc.request(
                        names.HISTORY_ROOM, payload, timeout=5, headers=headers
                    )
                    samples[label].append((time.perf_counter() - s) * 1000)
                    if reply.headers and reply.headers.get("Nats-Service-Error-Code"):
                        raise RuntimeError(f"history error: {reply.headers}")
                    page = codec.decode_as(pb.HistoryPage, reply.data, reply.headers)
                    if len(page.messages) != 50:
                        raise RuntimeError(
                            f"history page has {len(page.messages)} messages, not 50"
                        )
            sql = (
                "SELECT id, room, dm_lo, dm_hi, sender, content, ts_ms FROM messages"
                " WHERE room = $1 AND id < $2 ORDER BY id DESC LIMIT 50"
            )
            stmt = await conn.prepare(sql)
            for label, before in (("sql latest-50", "~"), ("sql page-before", None)):
                for i in range(queries):
                    s = time.perf_counter()
                    await stmt.fetch("hist0", before if before is not None else befores[i])
                    samples[label].append((time.perf_counter() - s) * 1000)
        finally:
            await nc.close()
    finally:
        await conn.close()
    return {"load_seconds": round(load_s, 1), "samples_ms": samples}


def history(ctx: Ctx) -> Run:
    _need("archive")
    total = ctx.scaled(1_000_000, 100_000)
    queries = ctx.scaled(2000, 300)
    with Cluster(ctx.workdir / "history") as c:
        c.start_postgres()
        c.archive()
        data = asyncio.run(_history_bench(c.start_nats(), c.database_url, total, queries))
    s = {k: sorted(v) for k, v in data["samples_ms"].items()}
    figs = []
    for kind in ("latest-50", "page-before"):
        p99 = percentile(s[kind], 99)
        figs.append(
            Figure(
                f"history {kind} p99 ({total:,} rows, via NATS)",
                p99,
                "ms",
                baseline=percentile(s[f"sql {kind}"], 99),
                target="<= 10 ms",
                passed=p99 <= 10,
            )
        )
        figs.append(
            Figure(
                f"history {kind} p50",
                percentile(s[kind], 50),
                "ms",
                baseline=percentile(s[f"sql {kind}"], 50),
            )
        )
    data["baseline"] = "the same query straight to Postgres (prepared statement) from the bench"
    return Run("history", figs, data)


# --- 7. presence -------------------------------------------------------------------------
async def _open_users(port: int, users: list[str], token_fn: Any) -> list[wsclient.WsConnection]:
    conns = []
    for user in users:
        welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_text(data: bytes, fut: asyncio.Future[None] = welcomed) -> None:
            if not fut.done() and b'"welcome"' in data:
                fut.set_result(None)

        conn = await wsclient.connect("127.0.0.1", port, "/ws", on_text)
        conn.send_text(
            orjson.dumps({"type": "hello", "v": 1, "token": token_fn(user), "rooms": []})
        )
        await asyncio.wait_for(welcomed, 20)
        conns.append(conn)
    return conns


async def _presence_bench(
    ctx: Ctx, c: Cluster, port_a: int, port_b: int, kill_a: Any
) -> dict[str, Any]:
    nc = await nats.connect(c.start_nats())
    online: dict[str, float] = {}
    offline: dict[str, float] = {}

    async def on_event(msg: Any) -> None:
        user = msg.subject.rsplit(".", 1)[-1]
        (online if msg.subject.startswith(names.PRESENCE_EVENT_ONLINE) else offline)[user] = (
            time.monotonic()
        )

    await nc.subscribe(names.PRESENCE_EVENTS_ALL, cb=on_event)

    async def wait_for(box: dict[str, float], users: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # Polling a dict the subscription callback fills: simpler than an event per user.
        while time.monotonic() < deadline and not all(u in box for u in users):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    try:
        killed_users = [f"pk{i}" for i in range(ctx.scaled(200, 30))]
        conns_a = await _open_users(port_a, killed_users, ctx.token_fn)
        await wait_for(online, killed_users, 20)
        t_kill = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, kill_a)
        await wait_for(offline, killed_users, 40)
        after_kill = sorted(offline[u] - t_kill for u in killed_users if u in offline)
        for conn in conns_a:
            conn.abort()
        closed_users = [f"pc{i}" for i in range(ctx.scaled(50, 10))]
        conns_b = await _open_users(port_b, closed_users, ctx.token_fn)
        await wait_for(online, closed_users, 20)
        after_close = []
        for user, conn in zip(closed_users, conns_b, strict=True):
            t0 = time.monotonic()
            conn.close()
            await wait_for(offline, [user], 5)
            if user in offline:
                after_close.append(offline[user] - t0)
        after_close.sort()
    finally:
        await nc.close()
    return {
        "kill_users": len(killed_users),
        "kill_offline_seen": len(after_kill),
        "after_kill_s": after_kill,
        "close_users": len(closed_users),
        "close_offline_seen": len(after_close),
        "after_close_s": after_close,
    }


def presence(ctx: Ctx) -> Run:
    _need("presence")
    _need("gateway")
    with Cluster(ctx.workdir / "presence") as c:
        c.presence()
        sp_a, a = c.gateway("bench-pres-a")
        _, b = c.gateway("bench-pres-b")
        data = asyncio.run(
            _presence_bench(ctx, c, a.port, b.port, lambda: c.stop_service(sp_a, kill=True))
        )
    k, cl = data["after_kill_s"], data["after_close_s"]
    worst_kill = k[-1] if len(k) == data["kill_users"] else float("inf")
    worst_close = cl[-1] if len(cl) == data["close_users"] else float("inf")
    figs = [
        Figure(
            f"offline after gateway SIGKILL (max of {data['kill_users']} users)",
            worst_kill,
            "s",
            target="<= 15 s",
            passed=worst_kill <= 15,
        ),
        Figure("offline after gateway SIGKILL (p50)", percentile(k, 50), "s"),
        Figure(
            f"offline after clean close (max of {data['close_users']})",
            worst_close,
            "s",
            target="<= 1 s",
            passed=worst_close <= 1,
        ),
        Figure("offline after clean close (p50)", percentile(cl, 50), "s"),
    ]
    return Run("presence", figs, data)
