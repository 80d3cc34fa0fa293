"""The archive's user-state side on NATS: the durable consumer that applies membership and
read events from the USERSTATE stream, mention events after messages are stored, and the
chat-userstate micro service (state on hello, room directory, DM thread list).

Two replicas share one durable consumer: each event is applied by one of them, acked only
after the commit, and applying it again (a redelivery after a crash) changes nothing
(see archive.userstate.apply_events), so no event is lost or applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import betterproto2
import nats.errors
import nats.js.errors
import nats.micro
from chatlib import codec, names, userstate_wire
from chatlib.proto.chat import v1 as pb
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.micro.request import Request, ServiceError
from nats.micro.service import Service as MicroService

from archive import userstate
from archive.handlers import DB_UNAVAILABLE, PoisonTask, Row, one_line
from archive.settings import ArchiveSettings
from archive.worker import backoff

log = logging.getLogger(__name__)

VERSION = "1.0.0"
BATCH = 500
TAIL_FETCH = 256
EVENT_SUBJECTS = [names.USER_MEMBERSHIP_ALL, names.USER_READ_ALL]
STATE_HEADERS = {names.HEADER_TYPE: codec.type_name(pb.UserState())}


class UserStateService:
    def __init__(self, nc: NATS, js: JetStreamContext, settings: ArchiveSettings) -> None:
        self.nc, self.js, self.settings = nc, js, settings
        self.pool: asyncpg.Pool | None = None
        self.micro: MicroService | None = None
        self.sub: JetStreamContext.PullSubscription | None = None
        self.stopping = False
        self.watermark = 0

    # --- micro service ------------------------------------------------------------------
    async def start_service(self) -> None:
        self.micro = await nats.micro.add_service(
            self.nc,
            name=names.SERVICE_USERSTATE,
            version=VERSION,
            description="User state: memberships, unread counts, rooms, DM threads",
            queue_group=names.QUEUE_USERSTATE,
        )
        for name, subject, handler in (
            ("state", names.USERSTATE_STATE, self._state),
            ("rooms", names.USERSTATE_ROOMS, self._rooms),
            ("threads", names.USERSTATE_THREADS, self._threads),
        ):
            await self.micro.add_endpoint(name=name, subject=subject, handler=handler)

    async def stop(self) -> None:
        self.stopping = True
        if self.micro is not None:
            await self.micro.stop()

    async def _answer(
        self,
        request: Request,
        cls: type[betterproto2.Message],
        work: Callable[[asyncpg.Pool, betterproto2.Message], Awaitable[betterproto2.Message]],
    ) -> None:
        try:
            query = codec.decode_as(cls, request.data, request.headers)
        except codec.DecodeError as exc:
            raise ServiceError("400", one_line(str(exc))) from exc
        if self.pool is None:
            raise ServiceError("503", "user-state database not available yet")
        try:
            answer = await work(self.pool, query)
        except DB_UNAVAILABLE as exc:
            raise ServiceError("503", "user-state database unavailable") from exc
        payload, headers = codec.encode(answer)
        await request.respond(payload, headers=headers)

    async def _state(self, request: Request) -> None:
        try:
            query = codec.decode_as(pb.UserStateRequest, request.data, request.headers)
        except codec.DecodeError as exc:
            raise ServiceError("400", one_line(str(exc))) from exc
        if self.pool is None:
            raise ServiceError("503", "user-state database not available yet")
        try:
            watermark = await userstate.advance_watermark(self.pool)
            try:
                tail = await self.unapplied(query.user)
            except Exception as exc:
                log.warning("cannot read unapplied user-state events: %s", exc)
                raise ServiceError("503", "user-state events unavailable") from exc
            state = await userstate.user_state(self.pool, query, watermark, tail)
        except DB_UNAVAILABLE as exc:
            raise ServiceError("503", "user-state database unavailable") from exc
        payload = userstate_wire.encode_user_state(
            state.rooms, state.threads, state.archived_through, state.first_use
        )
        await request.respond(payload, headers=dict(STATE_HEADERS))

    async def _rooms(self, request: Request) -> None:
        async def work(pool: asyncpg.Pool, query: betterproto2.Message) -> betterproto2.Message:
            assert isinstance(query, pb.RoomsRequest)
            return await userstate.room_directory(pool, query)

        await self._answer(request, pb.RoomsRequest, work)

    async def _threads(self, request: Request) -> None:
        async def work(pool: asyncpg.Pool, query: betterproto2.Message) -> betterproto2.Message:
            assert isinstance(query, pb.ThreadsRequest)
            return await userstate.dm_threads(pool, query)

        await self._answer(request, pb.ThreadsRequest, work)

    async def unapplied(self, user: str) -> userstate.Tail:
        """The user's events the consumer has not acked yet (maybe not applied): read from
        the stream after the consumer's ack floor. Nothing to read in the usual case."""
        info = await self.js.consumer_info(
            names.STREAM_USERSTATE, names.CONSUMER_USERSTATE, timeout=2
        )
        if not info.num_pending and not info.num_ack_pending:
            return userstate.Tail()
        floor = (info.ack_floor.stream_seq if info.ack_floor else 0) or 0
        # Other users' events are what usually waits: look at this user's last ones first
        # (two direct gets) before reading anything.
        latest = 0
        for subject in (names.membership_subject(user), names.read_subject(user)):
            try:
                last = await self.js.get_last_msg(names.STREAM_USERSTATE, subject)
            except nats.js.errors.NotFoundError:
                continue
            latest = max(latest, last.seq or 0)
        if latest <= floor:
            return userstate.Tail()
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=floor + 1,
            filter_subjects=[names.membership_subject(user), names.read_subject(user)],
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        consumer = await self.js.add_consumer(names.STREAM_USERSTATE, config)
        pending = consumer.num_pending or 0
        tail = userstate.Tail()
        if not pending:
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(names.STREAM_USERSTATE, consumer.name)
            return tail
        sub = await self.js.pull_subscribe_bind(
            consumer=consumer.name, stream=names.STREAM_USERSTATE
        )
        try:
            seen = 0
            while seen < pending:
                batch = await sub.fetch(min(TAIL_FETCH, pending - seen), timeout=2)
                for msg in batch:
                    seen += 1
                    with contextlib.suppress(codec.DecodeError, PoisonTask):
                        event = userstate.check_event(
                            msg.subject, codec.decode(msg.data, msg.headers)
                        )
                        tail.events.append(userstate.Event(msg.metadata.sequence.stream, event))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(names.STREAM_USERSTATE, consumer.name)
        return tail

    # --- applying events ----------------------------------------------------------------
    async def bind(self) -> None:
        config = api.ConsumerConfig(
            name=names.CONSUMER_USERSTATE,
            durable_name=names.CONSUMER_USERSTATE,
            description="Archive: membership and read events applied to Postgres",
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subjects=EVENT_SUBJECTS,
            ack_wait=self.settings.ack_wait,
            max_deliver=self.settings.max_deliver,
        )
        attempt = 0
        while not self.stopping:
            try:
                await self.js.add_consumer(names.STREAM_USERSTATE, config)
                self.sub = await self.js.pull_subscribe_bind(
                    durable=names.CONSUMER_USERSTATE, stream=names.STREAM_USERSTATE
                )
                return
            except Exception as exc:
                delay = backoff(attempt, base=0.2)
                log.warning("cannot bind user-state consumer (%s); retrying", exc)
                attempt += 1
                await asyncio.sleep(delay)

    async def run(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        await self.bind()
        while not self.stopping and self.sub is not None:
            try:
                msgs = await self.sub.fetch(BATCH, timeout=self.settings.fetch_timeout)
            except TimeoutError:  # nats-py's own or the plain one: see worker.fetch
                continue
            except Exception as exc:
                log.debug("user-state fetch failed: %s", exc)
                await asyncio.sleep(0.2)
                continue
            await self.apply(msgs)
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()

    async def apply(self, msgs: list[Msg]) -> None:
        assert self.pool is not None
        good: list[tuple[Msg, userstate.Event]] = []
        for msg in msgs:
            try:
                decoded = codec.decode(msg.data, msg.headers)
                event = userstate.check_event(msg.subject, decoded)
            except (codec.DecodeError, PoisonTask) as exc:
                await self.dead_letter(msg, str(exc))
                continue
            good.append((msg, userstate.Event(msg.metadata.sequence.stream, event)))
        attempt = 0
        while good:
            try:
                await userstate.apply_events(self.pool, [e for _, e in good])
                break
            except DB_UNAVAILABLE as exc:
                # Keep the batch: the events wait for Postgres (in_progress holds them).
                log.warning("postgres unavailable for user state (%s); retrying", exc)
                for msg, _ in good:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                await asyncio.sleep(backoff(attempt, cap=2.0))
                attempt += 1
                if self.stopping:
                    return  # not acked: redelivered to a replica that stays
            except asyncpg.PostgresError as exc:
                log.error("user-state batch refused (%s); it will be redelivered", exc)
                return
        for msg, _ in good:
            with contextlib.suppress(Exception):
                await msg.ack()
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=5)

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers[names.HEADER_DEAD_REASON] = one_line(reason)
        headers[names.HEADER_DEAD_SUBJECT] = msg.subject
        headers[names.HEADER_MSG_ID] = f"userstate-{msg.metadata.sequence.stream}"
        try:
            await self.js.publish(names.DEAD_LETTER_USERSTATE, msg.data, headers=headers)
        except Exception as exc:
            log.warning("could not dead-letter a user-state event: %s", exc)
            return
        log.warning("dead-lettered user-state event", extra={"reason": one_line(reason)})
        with contextlib.suppress(Exception):
            await msg.ack()

    # --- mentions -----------------------------------------------------------------------
    async def publish_mentions(self, found: list[tuple[str, Row]]) -> None:
        """A mention event per (member, message), deduplicated on both: a batch written
        twice (redelivered after a crash) publishes the same ids, stored once."""
        for user, row in found:
            event = pb.MentionEvent(
                message_id=row.id,
                user=user,
                room=row.room or "",
                sender=row.sender,
                seq=row.stream_seq or 0,
                ts_ms=row.ts_ms,
            )
            payload, headers = codec.encode(event)
            headers[names.HEADER_MSG_ID] = f"{row.id}:{user}"
            try:
                await self.js.publish(
                    names.mention_subject(user), payload, headers=headers, timeout=2
                )
            except Exception as exc:
                log.warning("mention event not published: %s", exc)

    async def keep_watermark(self, pool: asyncpg.Pool) -> None:
        """Advance the watermark in the background, so the hello path finds it near the
        head; the floor is the CHAT log's first sequence (older ones never come)."""
        try:
            info = await self.js.stream_info(names.STREAM_CHAT)
            state = info.state
            floor = max(0, (state.first_seq or 1) - 1) if state.messages else state.last_seq
            self.watermark = await userstate.advance_watermark(pool, floor)
        except DB_UNAVAILABLE:
            pass
        except Exception as exc:
            log.debug("watermark not advanced: %s", exc)
