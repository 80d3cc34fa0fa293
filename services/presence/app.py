"""Presence wiring and lifecycle: KV watch -> mirror, report subscriptions (queue group),
the sweeper, the 'who' micro service, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import betterproto2
from chatlib import codec, names, presence_wire
from chatlib.js_publisher import JetStreamPublisher
from chatlib.proto.chat import v1 as pb
from chatlib.tasks import CriticalTasks
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service as MicroService

from presence import handlers, metrics
from presence.latest import LatestPerKey
from presence.mirror import Mirror
from presence.settings import PresenceSettings
from presence.store import WRITE_TIMEOUT, Store, now_ms

log = logging.getLogger(__name__)

M = TypeVar("M", bound=betterproto2.Message)

VERSION = "1.0.0"
# Reports handled at once by one replica; more wait in NATS' pending buffer.
MAX_INFLIGHT = 256
GC_EVERY_S = 30.0


class PresenceService:
    name = "presence"

    def __init__(self, settings: PresenceSettings) -> None:
        self.settings = settings
        self.mirror = Mirror()
        self.clock = handlers.SweepClock(listening_since_ms=now_ms())
        self._nc: NATS | None = None
        self._kv: KeyValue | None = None
        self._store: Store | None = None
        self._publisher: JetStreamPublisher | None = None
        self._subs: list[Subscription] = []
        self._micro: MicroService | None = None
        self._critical = CriticalTasks()
        self._inflight: set[asyncio.Task[None]] = set()
        self._gate = asyncio.Semaphore(MAX_INFLIGHT)
        self._watcher: Any = None
        self._intake_open = False

    # --- Lifecycle -------------------------------------------------------------------
    async def start(self, nc: NATS, js: JetStreamContext) -> None:
        self._nc = nc
        self._kv = await js.key_value(names.KV_PRESENCE)
        self._publisher = JetStreamPublisher(nc, WRITE_TIMEOUT)
        await self._publisher.start()
        self._store = Store(js, self._kv, self.mirror, self._publisher)
        # Load the whole bucket before taking reports: the mirror guides every decision.
        self._watcher = await self._kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        self._spawn_forever(self._follow_bucket(loaded), "presence-watch")
        await loaded

        store, mirror = self._store, self.mirror
        self._subs = [
            await nc.subscribe(
                names.PRESENCE_CONN_OPENED,
                queue=names.QUEUE_PRESENCE,
                cb=self._on(
                    pb.ConnectionOpened,
                    lambda m: handlers.handle_opened(m, store),
                    fast=presence_wire.parse_connection_event,
                ),
            ),
            await nc.subscribe(
                names.PRESENCE_CONN_CLOSED,
                queue=names.QUEUE_PRESENCE,
                cb=self._on(
                    pb.ConnectionClosed,
                    lambda m: handlers.handle_closed(m, store),
                    fast=presence_wire.parse_connection_event,
                ),
            ),
            await nc.subscribe(
                names.PRESENCE_HEARTBEAT_ALL,
                queue=names.QUEUE_PRESENCE,
                cb=self._on(
                    pb.Heartbeat,
                    lambda m: handlers.handle_heartbeat(m, store, mirror),
                    fast=presence_wire.parse_heartbeat,
                    one_at_a_time_per=lambda m: m.gateway_id,
                ),
            ),
        ]
        self.clock.listening_since_ms = now_ms()
        self._intake_open = True
        self._micro = await add_service(
            nc,
            name=names.SERVICE_PRESENCE,
            version=VERSION,
            description="Who is online: pb.WhoRequest -> pb.WhoPage, sorted, paginated",
            queue_group=names.QUEUE_PRESENCE,
        )
        await self._micro.add_endpoint(
            name="who",
            subject=names.PRESENCE_WHO,
            handler=self._who,
            queue_group=names.QUEUE_PRESENCE,
        )
        self._spawn_forever(self._sweep_loop(), "presence-sweeper")
        log.info("presence ready: %d users online", self.mirror.online_count)

    async def stop_intake(self) -> None:
        self._intake_open = False
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []
        if self._micro is not None:
            with contextlib.suppress(Exception):
                await self._micro.stop()
        self._critical.cancel("presence-sweeper")

    async def finish_inflight(self) -> None:
        # Reports already taken finish their compare-and-set and publish their events, so a
        # stopping replica never leaves an event only in the outbox.
        while self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def close(self) -> None:
        await self._critical.stop()
        if self._publisher is not None:
            await self._publisher.stop()

    def alive(self) -> bool:
        return self._critical.alive()

    def ready(self) -> bool:
        return (
            self._intake_open
            and self.mirror.loaded
            and self._nc is not None
            and self._nc.is_connected
        )

    # --- Reports ---------------------------------------------------------------------
    def _on(
        self,
        cls: type[M],
        handle: Callable[[Any], Awaitable[None]],
        fast: Callable[[bytes], Any] | None = None,
        one_at_a_time_per: Callable[[Any], str] | None = None,
    ) -> Callable[[Msg], Coroutine[Any, Any, None]]:
        """A subscription callback: decode, then handle in its own task so a slow write
        never holds up the subscription (order does not matter, see handlers). `fast`: a
        hand-written reader of the canonical encoding (None: let the codec judge).
        `one_at_a_time_per`: the key of reports that supersede each other (a gateway's
        heartbeats): one handled at a time per key, only the newest waiting."""
        type_name = codec.type_name_of(cls)
        latest = LatestPerKey(handle) if one_at_a_time_per is not None else None

        async def callback(msg: Msg) -> None:
            try:
                message = None
                if fast is not None and (msg.headers or {}).get(names.HEADER_TYPE) == type_name:
                    message = fast(msg.data)
                if message is None:
                    message = codec.decode_as(cls, msg.data, msg.headers)
            except codec.DecodeError as exc:
                metrics.REJECTED.labels(reason="undecodable").inc()
                log.warning("undecodable report on %s: %s", msg.subject, exc)
                return
            work: Awaitable[None]
            if latest is not None and one_at_a_time_per is not None:
                key = one_at_a_time_per(message)
                if not latest.offer(key, message):
                    return  # the running handler of this key takes it when done
                work = latest.drain(key, message)
            else:
                work = handle(message)
            await self._gate.acquire()
            task = asyncio.create_task(self._guarded(work))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        return callback

    async def _guarded(self, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception:
            log.exception("presence report failed (the next heartbeat repairs it)")
        finally:
            self._gate.release()

    # --- The bucket ------------------------------------------------------------------
    async def _follow_bucket(self, loaded: asyncio.Future[None]) -> None:
        async for entry in self._watcher:
            if entry is None:
                self.mirror.loaded = True
                if not loaded.done():
                    loaded.set_result(None)
            else:
                self.mirror.apply(
                    entry.key,
                    entry.value,
                    int(entry.revision or 0),
                    deleted=entry.operation in ("DEL", "PURGE"),
                )
            metrics.ONLINE_USERS.set(self.mirror.online_count)
            metrics.CONNECTIONS.set(self.mirror.connections)

    async def _sweep_loop(self) -> None:
        assert self._store is not None and self._nc is not None
        last_gc = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            if not self._nc.is_connected:
                # Heartbeats are missed while we are cut off: silence counts from the
                # moment we hear again, or every gateway would look dead.
                self.clock.listening_since_ms = now_ms()
                continue
            try:
                await handlers.sweep(
                    self._store, self.mirror, self.settings.gateway_expiry, self.clock
                )
                if loop.time() - last_gc > GC_EVERY_S:
                    last_gc = loop.time()
                    await handlers.collect_garbage(
                        self._store, self.mirror, self.settings.gateway_expiry
                    )
            except Exception:
                log.exception("presence sweep failed; next one retries")
            metrics.ONLINE_USERS.set(self.mirror.online_count)
            metrics.CONNECTIONS.set(self.mirror.connections)

    def _spawn_forever(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self._critical.spawn(work, name=name)

    # --- Who is online ---------------------------------------------------------------
    async def _who(self, request: Request) -> None:
        try:
            who = codec.decode_as(pb.WhoRequest, request.data, request.headers)
            page = handlers.who_page(who, self.mirror, self.settings.who_page_max)
        except (codec.DecodeError, handlers.BadRequest) as exc:
            await request.respond_error("400", str(exc))
            return
        if not self.mirror.loaded:
            await request.respond_error("503", "presence state not loaded yet")
            return
        payload, headers = codec.encode(page)
        await request.respond(payload, headers=headers)
