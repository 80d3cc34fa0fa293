"""What presence does with each report, each sweep and each 'who' request.

Plain async functions over decoded messages, the store and the mirror. Reports may be
handled in any order and by any replica: each rule is idempotent and decided on the
stored state under compare-and-set (see store.py), and closed connections leave a
tombstone so that a late 'opened' or an old heartbeat cannot bring them back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

from chatlib import presence_wire
from chatlib.proto.chat import v1 as pb
from chatlib.validate import is_valid_name

from presence import metrics
from presence.mirror import Mirror
from presence.state import gateway_key, is_valid_id, user_key
from presence.store import PENDING_GRACE_MS, Store, now_ms

log = logging.getLogger(__name__)

# Writes one heartbeat or sweep may have in flight at once.
CONCURRENCY = 32
# How long a gateway key outlives its gateway's last connection before it is deleted.
GATEWAY_KEY_TTL_MS = 60_000


class BadRequest(Exception):
    """A 'who' request presence cannot answer as asked (micro error 400)."""


def valid_report(gateway_id: str, connection_id: str, user: str) -> bool:
    if not is_valid_id(gateway_id):
        metrics.REJECTED.labels(reason="gateway_id").inc()
    elif not is_valid_id(connection_id):
        metrics.REJECTED.labels(reason="connection_id").inc()
    elif not is_valid_name(user):
        metrics.REJECTED.labels(reason="user").inc()
    else:
        return True
    log.warning("dropped presence report: gateway=%r connection=%r user=%r", gateway_id,
                connection_id, user)  # fmt: skip
    return False


async def bounded(jobs: Iterable[Awaitable[object]]) -> None:
    """Run the jobs with at most CONCURRENCY at once; one failing does not stop the others."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def run(job: Awaitable[object]) -> None:
        async with gate:
            try:
                await job
            except Exception as exc:
                log.warning("presence write failed (the next heartbeat or sweep retries): %s",
                            exc)  # fmt: skip

    await asyncio.gather(*(run(job) for job in jobs))


async def handle_opened(
    message: pb.ConnectionOpened | presence_wire.ConnectionEvent, store: Store
) -> None:
    if not valid_report(message.gateway_id, message.connection_id, message.user):
        return
    await store.mutate(
        message.user,
        lambda s: s.open(message.connection_id, message.gateway_id, message.ts_ms, now_ms()),
    )


async def handle_closed(
    message: pb.ConnectionClosed | presence_wire.ConnectionEvent, store: Store
) -> None:
    if not valid_report(message.gateway_id, message.connection_id, message.user):
        return
    await store.mutate(message.user, lambda s: s.close(message.connection_id, now_ms()))


async def handle_heartbeat(
    message: pb.Heartbeat | presence_wire.Heartbeat, store: Store, mirror: Mirror
) -> None:
    """The heartbeat is the truth about one gateway: record that it lives, add what it
    lists and presence lacks, drop what presence has and it no longer lists."""
    gateway = message.gateway_id
    if not is_valid_id(gateway):
        metrics.REJECTED.labels(reason="gateway_id").inc()
        return
    now = now_ms()
    metrics.HEARTBEAT_LAG.observe(max(0.0, (now - message.ts_ms) / 1000))
    await store.touch_gateway(gateway, now, message.ts_ms)

    listed: dict[str, str] = {}
    for conn in message.connections:
        if valid_report(gateway, conn.connection_id, conn.user):
            listed[conn.connection_id] = conn.user

    def add(cid: str) -> Awaitable[bool]:
        return store.mutate(listed[cid], lambda s: s.open(cid, gateway, message.ts_ms, now_ms()))

    def drop(cid: str, user: str) -> Awaitable[bool]:
        return store.mutate(user, lambda s: s.drop_unlisted(cid, gateway, message.ts_ms, now_ms()))

    missing = [cid for cid, user in listed.items() if not mirror.has_conn_or_tombstone(user, cid)]
    unlisted = [(cid, user) for cid, user in mirror.conns_of(gateway).items() if cid not in listed]
    await bounded([add(cid) for cid in missing] + [drop(cid, user) for cid, user in unlisted])


@dataclass
class SweepClock:
    """When this replica started listening (or last got its NATS connection back).
    Heartbeats sent while no replica listened were lost, so silence only counts from here:
    restarting presence never expires live gateways."""

    listening_since_ms: int


async def sweep(store: Store, mirror: Mirror, expiry_s: float, clock: SweepClock) -> None:
    """Expire silent gateways, publish events left pending, collect idle keys. Every
    replica sweeps; compare-and-set makes concurrent sweeps harmless."""
    now = now_ms()
    cutoff = now - int(expiry_s * 1000)
    jobs: list[Awaitable[object]] = []
    for gateway, conns in list(mirror.by_gateway.items()):
        held = mirror.gateways.get(gateway)
        last_alive = max(
            [clock.listening_since_ms, held[0].seen_ms if held else 0]
            + [mirror.users[u][0].conns[c].seen_ms for c, u in conns.items() if u in mirror.users
               and c in mirror.users[u][0].conns]
        )  # fmt: skip
        if last_alive >= cutoff:
            continue
        log.info("gateway %s silent since %d ms: dropping %d connections", gateway,
                 now - last_alive, len(conns))  # fmt: skip
        for cid, user in conns.items():
            jobs.append(expire(store, user, cid, gateway, cutoff))
    for user in list(mirror.with_pending):
        held_user = mirror.users.get(user)
        if held_user and any(now - e.ts_ms > PENDING_GRACE_MS for e in held_user[0].pending):
            jobs.append(store.flush(user))
    await bounded(jobs)


async def expire(store: Store, user: str, cid: str, gateway: str, cutoff: int) -> None:
    if await store.mutate(user, lambda s: s.expire(cid, gateway, cutoff)):
        metrics.SWEPT.inc()


async def collect_garbage(store: Store, mirror: Mirror, expiry_s: float) -> None:
    """Delete user keys with nothing left to remember and gateway keys long dead, so the
    bucket holds what is live, not everyone who ever connected."""
    now = now_ms()
    for user, (state, revision) in list(mirror.users.items()):
        if state.idle(now):
            await store.delete_if_unchanged(user_key(user), revision)
    for gateway, (gw_state, revision) in list(mirror.gateways.items()):
        dead_for = now - gw_state.seen_ms - int(expiry_s * 1000)
        if dead_for > GATEWAY_KEY_TTL_MS and gateway not in mirror.by_gateway:
            await store.delete_if_unchanged(gateway_key(gateway), revision)


def who_page(request: pb.WhoRequest, mirror: Mirror, page_max: int) -> pb.WhoPage:
    if len(request.after) > 64:
        raise BadRequest("after: too long")
    limit = min(request.limit or page_max, page_max)
    users, next_after, total = mirror.page(request.after, limit)
    return pb.WhoPage(users=users, next_after=next_after, total=total)
