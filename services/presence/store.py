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

import logging
import time
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chatlib import codec, names
from chatlib.proto.chat import v1 as pb
from presence import metrics
from presence.mirror import Mirror
from presence.state import GatewayState, PendingEvent, UserState, gateway_key, user_key

log = logging.getLogger(__name__)

# Far more than two replicas ever collide on one user; a bound keeps a bug from spinning.
MAX_ATTEMPTS = 50

Change = Callable[[UserState], bool]


def now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    def __init__(self, js: JetStreamContext, kv: KeyValue, mirror: Mirror) -> None:
        self.js = js
        self.kv = kv
        self.mirror = mirror

    async def read_user(self, user: str) -> tuple[UserState, int]:
        """The stored state and its revision (0 when the key never existed)."""
        try:
            entry = await self.kv.get(user_key(user))
        except KeyDeletedError as exc:
            return UserState(), int(exc.entry.revision or 0) if exc.entry else 0
        except KeyNotFoundError:
            return UserState(), 0
        return UserState.decode(entry.value), int(entry.revision or 0)

    async def mutate(self, user: str, change: Change) -> bool:
        """Apply `change` to the user's stored state under compare-and-set.

        The mirror's copy is the first guess (saves a read); a conflict, or a guess that
        says "nothing to do", is settled on a fresh read. Returns True if a write landed.
        """
        guess = self.mirror.user(user)
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
            state.note_transition(was_online, now)
            try:
                new_revision = await self.kv.update(user_key(user), state.encode(), last=revision)
            except KeyWrongLastSequenceError:
                metrics.CAS_CONFLICTS.inc()
                state, revision = await self.read_user(user)
                fresh = True
                continue
            self.mirror.apply(user_key(user), state.encode(), new_revision)
            if state.pending:
                await self.flush(user, state, new_revision)
            return True
        log.error("gave up changing presence of %s after %d conflicts", user, MAX_ATTEMPTS)
        return False

    async def flush(self, user: str, state: UserState | None = None, revision: int = 0) -> None:
        """Publish the user's pending events (in order), then remove them from the value."""
        if state is None:
            state, revision = await self.read_user(user)
        published: set[str] = set()
        for _ in range(MAX_ATTEMPTS):
            for event in state.pending:
                if event.event_id not in published:
                    await self.publish_event(user, event)
                    published.add(event.event_id)
            if not state.pending:
                return
            state.pending = [e for e in state.pending if e.event_id not in published]
            try:
                new_revision = await self.kv.update(user_key(user), state.encode(), last=revision)
            except KeyWrongLastSequenceError:
                # Someone else wrote meanwhile (maybe another transition, maybe a sweeper
                # that already cleared ours): re-read and publish only what is new.
                metrics.CAS_CONFLICTS.inc()
                state, revision = await self.read_user(user)
                continue
            self.mirror.apply(user_key(user), state.encode(), new_revision)
            return

    async def publish_event(self, user: str, event: PendingEvent) -> None:
        message: pb.UserOnline | pb.UserOffline
        if event.kind == "online":
            message, subject = pb.UserOnline(user=user, ts_ms=event.ts_ms), names.online_subject(user)
        else:
            message = pb.UserOffline(user=user, ts_ms=event.ts_ms)
            subject = names.offline_subject(user)
        payload, headers = codec.encode(message)
        headers[names.HEADER_MSG_ID] = event.event_id
        ack = await self.js.publish(subject, payload, headers=headers)
        if not ack.duplicate:
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
