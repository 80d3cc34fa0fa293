"""The presence bucket behind compare-and-set, and the online/offline event outbox.

Why compare-and-set on the KV revision: every replica may handle any report (queue
groups spread them, sweepers run everywhere), so two replicas can change one user at the
same moment. A write only lands if the key is still at the revision the change was
computed from (`kv.update(key, value, last=revision)`); the loser re-reads and re-decides.
So exactly one write turns a user's connection set empty -> non-empty (or back), and that
write also records the event to announce (`pending`, an outbox in the same value). The
writer then publishes it to the PRESENCE stream with Nats-Msg-Id = the event id and
removes it from `pending`. If the writer dies in between, any replica's sweeper publishes
it again with the same id, which the stream drops as a duplicate if the first publish
made it: exactly one event per transition, never none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from chatlib import codec, names, presence_wire
from chatlib.js_publisher import JetStreamPublisher
from chatlib.proto.chat import v1 as pb
from nats.js import JetStreamContext, api
from nats.js.errors import (
    APIError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from presence import metrics
from presence.mirror import Mirror
from presence.state import GatewayState, PendingEvent, UserState, gateway_key, user_key

log = logging.getLogger(__name__)

# Far more than two replicas ever collide on one user; a bound keeps a bug from spinning.
MAX_ATTEMPTS = 50
_USER_ONLINE = codec.type_name_of(pb.UserOnline)
_USER_OFFLINE = codec.type_name_of(pb.UserOffline)
# How long a write through the publisher waits for its PubAck: js.publish's default.
WRITE_TIMEOUT = 5.0
# The JetStream errors nats-py's kv.update turns into KeyWrongLastSequenceError.
_WRONG_LAST_SEQUENCE = (10071, 10164)

Change = Callable[[UserState], bool]


# A pending event older than this was left by a writer that died or failed to publish:
# any replica publishes it. Younger ones are most likely being published right now.
PENDING_GRACE_MS = 1000


def event_subject(user: str, event: PendingEvent) -> str:
    return names.online_subject(user) if event.kind == "online" else names.offline_subject(user)


def now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    def __init__(
        self,
        js: JetStreamContext,
        kv: KeyValue,
        mirror: Mirror,
        publisher: JetStreamPublisher | None = None,
    ) -> None:
        self.js = js
        self.kv = kv
        self.mirror = mirror
        self.publisher = publisher

    async def update(self, key: str, value: bytes, last: int) -> int:
        """kv.update(key, value, last=last): the new revision, KeyWrongLastSequenceError
        when the key is not at `last`. Through the shared publisher when there is one
        (three writes per connection opened: its PubAcks come on one subscription, not
        one request each); tests/test_presence_state.py pins it to kv.update."""
        if self.publisher is None:
            return await self.kv.update(key, value, last=last)
        headers = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last)}
        try:
            ack = await self.publisher.publish(
                names.kv_subject(names.KV_PRESENCE, key), value, headers
            )
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise KeyWrongLastSequenceError(description=exc.description) from exc
            raise
        return int(ack.seq)

    async def read_user(self, user: str) -> tuple[UserState, int]:
        """The stored state and its revision (0 when the key never existed)."""
        try:
            entry = await self.kv.get(user_key(user))
        except (KeyDeletedError, KeyNotFoundError) as exc:
            # A collected key's last message is its delete marker, and the next write
            # must name the marker's revision: 0 would conflict forever. nats-py's kv.get
            # reports a deleted key as KeyNotFoundError carrying the marker in `entry`.
            marker = getattr(exc, "entry", None)
            return UserState(), int(marker.revision or 0) if marker is not None else 0
        return UserState.decode(entry.value), int(entry.revision or 0)

    async def mutate(self, user: str, change: Change) -> bool:
        """Apply `change` to the user's stored state under compare-and-set.

        The mirror's copy is the first guess (saves a read); a conflict, or a guess that
        says "nothing to do", is settled on a fresh read. Returns True if a write landed.
        """
        guess = self.mirror.user(user)
        if guess is None and self.mirror.loaded:
            # No key as far as the mirror knows (a new user, or one whose idle key was
            # collected): guess "no state, revision 0" and write it as a create. A key
            # that exists after all (the mirror is behind) fails the compare-and-set and
            # is read then; the usual first connection of a user costs no read.
            guess = (UserState(), 0)
        fresh = guess is None
        state, revision = guess if guess is not None else await self.read_user(user)
        for _ in range(MAX_ATTEMPTS):
            now = now_ms()
            was_online = state.online
            changed = change(state)
            if not changed and not fresh:
                state, revision = await self.read_user(user)
                fresh = True
                continue
            if not changed:
                return False
            state.prune(now)
            created = state.note_transition(was_online, now)
            try:
                new_revision = await self.update(user_key(user), state.encode(), revision)
            except KeyWrongLastSequenceError:
                metrics.CAS_CONFLICTS.inc()
                state, revision = await self.read_user(user)
                fresh = True
                continue
            self.mirror.apply(user_key(user), state.encode(), new_revision)
            if created is not None:
                await self.flush(user, state, new_revision, mine={created.event_id})
            return True
        log.error("gave up changing presence of %s after %d conflicts", user, MAX_ATTEMPTS)
        return False

    async def flush(
        self,
        user: str,
        state: UserState | None = None,
        revision: int = 0,
        mine: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        """Publish our pending event (after the ones before it), then remove what we
        published from the value. Without `mine` (the sweeper), publish the events whose
        writers seem dead: those pending longer than PENDING_GRACE_MS."""
        if state is None:
            state, revision = await self.read_user(user)
        if mine:
            events = list(state.pending)
        else:
            events = [e for e in state.pending if now_ms() - e.ts_ms > PENDING_GRACE_MS]
        if not events:
            return
        await self.publish_in_order(user, events, mine)
        done = {e.event_id for e in events}
        for _ in range(MAX_ATTEMPTS):
            if not any(e.event_id in done for e in state.pending):
                return
            state.pending = [e for e in state.pending if e.event_id not in done]
            try:
                new_revision = await self.update(user_key(user), state.encode(), revision)
            except KeyWrongLastSequenceError:
                # Someone else wrote meanwhile: re-read and remove ours again. Events that
                # appeared since are their writers' to publish.
                metrics.CAS_CONFLICTS.inc()
                state, revision = await self.read_user(user)
                continue
            self.mirror.apply(user_key(user), state.encode(), new_revision)
            return

    async def publish_in_order(
        self, user: str, events: list[PendingEvent], mine: frozenset[str] | set[str]
    ) -> None:
        """Events we created are published at once. An older one belongs to another
        writer, which is probably publishing it right now: we wait for it to be published
        (gone from the pending list, or found in the stream), keeping the order, and
        publish it ourselves only once it is older than PENDING_GRACE_MS (its writer is
        likely dead). Core subscribers, which the stream's deduplication does not cover,
        so see each event once."""
        i = 0
        while i < len(events):
            event = events[i]
            if event.event_id in mine:
                await self.publish_event(user, event)
                i += 1
                continue
            if not self.mirror.is_pending(user, event.event_id):
                i += 1  # its writer published it and cleared it
                continue
            # Every writer publishes a user's events in order, so the latest pending
            # event found in the stream means all before it are there too.
            reached = await self.last_published_index(user, events)
            if reached >= i:
                i = reached + 1
            elif now_ms() - event.ts_ms > PENDING_GRACE_MS:
                await self.publish_event(user, event)
                i += 1
            else:
                await asyncio.sleep(0.01)

    async def last_published_index(self, user: str, events: list[PendingEvent]) -> int:
        """Index of the latest of `events` that is the last message on its subject, or -1."""
        last_ids: set[str] = set()
        for subject in (names.online_subject(user), names.offline_subject(user)):
            try:
                last = await self.js.get_last_msg(names.STREAM_PRESENCE, subject)
            except NotFoundError:
                continue
            if last.headers and names.HEADER_MSG_ID in last.headers:
                last_ids.add(last.headers[names.HEADER_MSG_ID])
        found = [i for i, event in enumerate(events) if event.event_id in last_ids]
        return max(found, default=-1)

    async def publish_event(self, user: str, event: PendingEvent) -> None:
        if event.kind == "online":
            subject, type_name = names.online_subject(user), _USER_ONLINE
        else:
            subject, type_name = names.offline_subject(user), _USER_OFFLINE
        # Byte for byte codec.encode(pb.UserOnline / UserOffline(...)) (presence_wire).
        payload = presence_wire.encode_user_event(user, event.ts_ms)
        headers = {names.HEADER_TYPE: type_name, names.HEADER_MSG_ID: event.event_id}
        if self.publisher is not None:
            ack = await self.publisher.publish(subject, payload, headers)
        else:
            ack = await self.js.publish(subject, payload, headers=headers)
        if ack.duplicate:
            # Only a writer's retry after a crash gets here; core subscribers saw it twice.
            log.info("user %s %s already published", user, event.kind,
                     extra={"event_id": event.event_id})  # fmt: skip
        else:
            metrics.EVENTS.labels(kind=event.kind).inc()
            log.info("user %s %s", user, event.kind, extra={"event_id": event.event_id})

    async def touch_gateway(self, gateway_id: str, seen_ms: int, hb_ts_ms: int) -> None:
        """Record a heartbeat. Last writer wins: heartbeats of one gateway only move on."""
        value = GatewayState(seen_ms=seen_ms, hb_ts_ms=hb_ts_ms).encode()
        revision = await self.kv.put(gateway_key(gateway_id), value)
        self.mirror.apply(gateway_key(gateway_id), value, revision)

    async def delete_if_unchanged(self, key: str, revision: int) -> None:
        """Garbage-collect a key nobody touched since we looked at it."""
        try:
            await self.kv.delete(key, last=revision)
        except Exception as exc:  # a newer write won: it is in use again, keep it
            log.debug("kept %s: %s", key, exc)
