"""Wiring and lifecycle of the archive: Postgres pool + migrations, the durable pull
consumer and its worker, the history micro service, health and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import nats.micro
import orjson
from chatlib import codec, names
from chatlib.proto.chat import v1 as pb
from chatlib.tasks import CriticalTasks
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.micro.request import Request, ServiceError
from nats.micro.service import Service as MicroService

from archive import handlers, lifecycle, metrics, migrations
from archive.pull import BatchPuller
from archive.settings import ArchiveSettings
from archive.userstate_service import UserStateService
from archive.worker import ArchiveWorker, backoff

log = logging.getLogger(__name__)

VERSION = "1.0.0"
HistoryHandler = Callable[[asyncpg.Pool, pb.HistoryRequest, int], Awaitable[bytes]]
# A misconfiguration is not fixed in milliseconds: retry it, but not in a tight loop.
REFUSED_RETRY_CAP = 15.0
PAGE_HEADERS = {names.HEADER_TYPE: codec.type_name(pb.HistoryPage())}


class ArchiveService:
    name = "archive"

    def __init__(self, settings: ArchiveSettings) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.pool: asyncpg.Pool | None = None
        self.worker: ArchiveWorker | None = None
        self.micro: MicroService | None = None
        self.db_up = False
        self.consuming = False
        self.stopping = False
        self.tasks = CriticalTasks()
        self._main: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._advisories: Subscription | None = None
        self.userstate: UserStateService | None = None
        self._userstate_task: asyncio.Task[None] | None = None

    # --- lifecycle (chatlib.lifecycle.Service) ----------------------------------------

    async def start(self, nc: NATS, js: JetStreamContext) -> None:
        self.nc, self.js = nc, js
        # The history service answers from the start (503 until the database is ready),
        # so `nats micro ls` shows every replica even while Postgres is still coming up.
        self.micro = await nats.micro.add_service(
            nc,
            name=names.SERVICE_HISTORY,
            version=VERSION,
            description="Chat history from the archive: room pages and DM threads",
            queue_group=names.QUEUE_HISTORY,
        )
        await self.micro.add_endpoint(
            name="room", subject=names.HISTORY_ROOM, handler=self._history_room
        )
        await self.micro.add_endpoint(name="dm", subject=names.HISTORY_DM, handler=self._history_dm)
        # Issue 14: the gateway's authorship check, and full-text search.
        await self.micro.add_endpoint(
            name="message", subject=names.HISTORY_MESSAGE, handler=self._lookup
        )
        await self.micro.add_endpoint(
            name="search", subject=names.HISTORY_SEARCH, handler=self._search
        )
        self.userstate = UserStateService(nc, js, self.settings)
        await self.userstate.start_service()
        # Connecting to Postgres may take a while (it may be down): do it in the background
        # so a SIGTERM meanwhile is still handled promptly.
        # One replica (queue group) handles each max-deliveries advisory.
        self._advisories = await nc.subscribe(
            names.ADVISORY_ARCHIVE_MAX_DELIVERIES, queue=names.QUEUE_ARCHIVE, cb=self._exhausted
        )
        self._main = self.tasks.spawn(self._consume(), name="archive-consume")
        self._monitor = self.tasks.spawn(self._watch(), name="archive-monitor")

    def ready(self) -> bool:
        connected = self.nc is not None and self.nc.is_connected
        return connected and self.consuming and self.db_up and not self.stopping

    def alive(self) -> bool:
        return self.tasks.alive()

    async def stop_intake(self) -> None:
        self.stopping = True
        if self.worker:
            self.worker.stop()
        if self.micro:
            await self.micro.stop()
        if self.userstate:
            await self.userstate.stop()
        if self._advisories:
            await self._advisories.unsubscribe()
        if self._monitor:
            self._monitor.cancel()

    async def finish_inflight(self) -> None:
        """Wait for the batch in hand to be committed and acked. Before the worker runs
        there is nothing in hand, so startup (waiting for Postgres) is simply cancelled."""
        if self._main is None:
            return
        if self.worker is None:
            self._main.cancel()
        # wait, not await: a task that died has been logged already (chatlib.tasks).
        await asyncio.wait({self._main})
        if self._userstate_task is not None:
            # Its batch in hand is applied and acked before it returns.
            await asyncio.wait({self._userstate_task}, timeout=self.settings.drain_timeout)
        # The pull subscription may hold a late reply to its last fetch that nobody will
        # read; NATS's drain would wait on it for the whole drain timeout.
        if self.worker is not None:
            await self.worker.puller.stop()

    async def close(self) -> None:
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), 5)
            except TimeoutError:
                self.pool.terminate()

    # --- consuming --------------------------------------------------------------------

    async def _consume(self) -> None:
        assert self.nc is not None and self.js is not None
        self.pool = await self._open_database()
        puller = await self._bind_consumer(self.js)
        assert self.userstate is not None
        self.worker = ArchiveWorker(
            self.nc,
            self.js,
            puller,
            self.pool,
            self.settings,
            self._set_db_state,
            self.userstate.publish_mentions,
        )
        if self.stopping:
            return
        self._userstate_task = self.tasks.spawn(
            self.userstate.run(self.pool), name="archive-userstate"
        )
        self.consuming = True
        log.info("consuming %s as %s", names.STREAM_ARCHIVE, names.CONSUMER_ARCHIVE)
        await self.worker.run()

    async def _open_database(self) -> asyncpg.Pool:
        """Pool + migrations, retried with backoff until Postgres answers. A refusal (no
        such database, wrong password, unknown role) is retried too, since an operator
        may fix it while we wait, but logged as an error with its SQLSTATE each time."""
        attempt = 0
        while True:
            try:
                pool = await asyncpg.create_pool(
                    self.settings.database_url,
                    min_size=self.settings.db_pool_min,
                    max_size=self.settings.db_pool_max,
                    timeout=5,
                    command_timeout=30,
                )
                async with pool.acquire() as conn:
                    await migrations.migrate(conn)
                self._set_db_state(True)
                return pool
            except handlers.DB_UNAVAILABLE as exc:
                delay = backoff(attempt, base=0.2)
                log.warning("postgres not reachable (%s); retrying in %.2fs", exc, delay)
            except asyncpg.PostgresError as exc:
                delay = backoff(attempt, base=0.5, cap=REFUSED_RETRY_CAP)
                log.error(
                    "postgres refused the archive (SQLSTATE %s: %s); check "
                    "ARCHIVE_DATABASE_URL; retrying in %.2fs",
                    exc.sqlstate,
                    handlers.one_line(str(exc)),
                    delay,
                )
            attempt += 1
            await asyncio.sleep(delay)

    async def _bind_consumer(self, js: JetStreamContext) -> BatchPuller:
        """Create (or update to the current settings) the durable consumer every replica
        shares, then bind to it. Creating it is idempotent, so replicas may race."""
        config = api.ConsumerConfig(
            name=names.CONSUMER_ARCHIVE,
            durable_name=names.CONSUMER_ARCHIVE,
            description="Archive writers: every task written to Postgres once",
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.settings.ack_wait,
            max_deliver=self.settings.max_deliver,
            # Enough for a full batch in hand on several replicas at once.
            max_ack_pending=max(1000, self.settings.batch_size * 8),
        )
        attempt = 0
        while True:
            try:
                await js.add_consumer(names.STREAM_ARCHIVE, config)
                assert self.nc is not None
                puller = BatchPuller(self.nc, names.STREAM_ARCHIVE, names.CONSUMER_ARCHIVE)
                await puller.start()
                return puller
            except Exception as exc:  # NATS reconnecting, JetStream not ready yet
                delay = backoff(attempt, base=0.2)
                log.warning("cannot bind consumer (%s); retrying in %.2fs", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def _exhausted(self, msg: Msg) -> None:
        try:
            stream_seq = int(orjson.loads(msg.data)["stream_seq"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable max-deliveries advisory: %r", msg.data[:200])
            return
        if self.worker is None:
            return  # not consuming yet; JetStream keeps the task, an operator can see it
        try:
            await self.worker.park_exhausted(stream_seq)
        except Exception as exc:
            log.warning("could not park exhausted task %d: %s", stream_seq, exc)

    def _set_db_state(self, up: bool) -> None:
        if up != self.db_up:
            log.info("postgres %s", "reachable" if up else "unreachable")
        self.db_up = up
        metrics.DB_UP.set(1 if up else 0)

    async def _watch(self) -> None:
        """Refresh lag metrics and readiness: an idle replica must notice an outage too."""
        while True:
            await asyncio.sleep(self.settings.monitor_interval)
            if self.pool is not None:
                try:
                    await self.pool.fetchval("SELECT 1", timeout=2)
                    self._set_db_state(True)
                    if self.consuming and self.js is not None:
                        await self._sweep_lifecycle(self.js)
                except handlers.DB_UNAVAILABLE:
                    self._set_db_state(False)
            if self.pool is not None and self.userstate is not None:
                await self.userstate.keep_watermark(self.pool)
            if self.js is not None and self.consuming:
                try:
                    info = await self.js.consumer_info(
                        names.STREAM_ARCHIVE, names.CONSUMER_ARCHIVE, timeout=2
                    )
                    metrics.CONSUMER_PENDING.set(info.num_pending or 0)
                    metrics.CONSUMER_ACK_PENDING.set(info.num_ack_pending or 0)
                except Exception as exc:
                    log.debug("consumer info unavailable: %s", exc)

    async def _sweep_lifecycle(self, js: JetStreamContext) -> None:
        """Events whose message arrived on another replica at the same moment."""
        assert self.pool is not None
        try:
            window = int(self.settings.edit_window_s * 1000)
            await lifecycle.purge_from_log(js, await lifecycle.sweep(self.pool, window))
        except Exception as exc:
            log.warning("lifecycle sweep failed: %s", exc)

    # --- history ----------------------------------------------------------------------

    async def _history_room(self, request: Request) -> None:
        await self._answer(request, handlers.room_history)

    async def _history_dm(self, request: Request) -> None:
        await self._answer(request, handlers.dm_history)

    async def _lookup(self, request: Request) -> None:
        await self._query(request, pb.MessageLookup, lifecycle.lookup, pb.MessageInfo)

    async def _search(self, request: Request) -> None:
        await self._query(request, pb.SearchRequest, lifecycle.search, pb.SearchPage)

    async def _query(
        self,
        request: Request,
        kind: type[Any],
        handler: Callable[[asyncpg.Pool, Any], Awaitable[bytes]],
        answer: type[Any],
    ) -> None:
        try:
            query = codec.decode_as(kind, request.data, request.headers)
        except codec.DecodeError as exc:
            raise ServiceError("400", handlers.one_line(str(exc))) from exc
        if self.pool is None:
            raise ServiceError("503", "history database not available yet")
        try:
            data = await handler(self.pool, query)
        except handlers.DB_UNAVAILABLE as exc:
            raise ServiceError("503", "history database unavailable") from exc
        await request.respond(data, headers={names.HEADER_TYPE: codec.type_name(answer())})

    async def _answer(self, request: Request, handler: HistoryHandler) -> None:
        try:
            query = codec.decode_as(pb.HistoryRequest, request.data, request.headers)
        except codec.DecodeError as exc:
            raise ServiceError("400", handlers.one_line(str(exc))) from exc
        if self.pool is None:
            raise ServiceError("503", "history database not available yet")
        try:
            page = await handler(self.pool, query, self.settings.history_page_max)
        except handlers.DB_UNAVAILABLE as exc:
            raise ServiceError("503", "history database unavailable") from exc
        await request.respond(page, headers=dict(PAGE_HEADERS))
