"""Live fan-out from NATS to local sockets.

A gateway subscribes (core NATS) to live.chat.room.<room> and typing.room.<room> while the
room has a local member (reference-counted), and once, gateway-wide, to every DM
(live.chat.dm.*.* and typing.dm.*.*), dispatched locally to the participants' sessions:
a hello then needs no NATS subscription of its own. Each message is
decoded once and rendered once (frames.MessageFrames); sockets get the same text.

Gaps: each live message carries Nats-Last-Sequence, the previous seq on its subject. If
that is above the last seq this subscription delivered on the subject (messages went by
while our NATS connection was down), the missing ones are read from the CHAT stream and
delivered first, so members still see the room's order with nothing missing.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, MutableMapping

from chatlib import codec, message_events, names, presence_wire
from chatlib.message_events import ChatEvent
from chatlib.nats_client import queues_messages, subscribe_handler
from chatlib.proto.chat import v1 as pb
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from gateway import frames, metrics, recovery
from gateway.ordering import StreamOrder
from gateway.replay_cache import SharedReplay
from gateway.session import Session

log = logging.getLogger(__name__)


# Last seq delivered per DM subject, for gap detection: bounded (DM threads are many).
DM_DELIVERED_MAX = 100_000
_USER_ONLINE = codec.type_name_of(pb.UserOnline)
_USER_OFFLINE = codec.type_name_of(pb.UserOffline)
# Messages published here whose live copy has not come back yet (see Hub.published).
PUBLISHED_MAX = 4096
LiveHandler = Callable[[Msg], Awaitable[None]]


class Hub:
    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self.nc, self.js = nc, js
        self.sessions: set[Session] = set()
        self.room_members: dict[str, set[Session]] = {}
        self.user_sessions: dict[str, set[Session]] = {}
        # room -> its subscriptions; the list is filled once they exist (see join).
        self._room_subs: dict[str, list[Subscription]] = {}
        self._global_subs: list[Subscription] = []
        # A message delivered twice (live + refill) is rendered once.
        self._recent: OrderedDict[int, frames.MessageFrames] = OrderedDict()
        # chat subject -> last seq delivered, for gap detection (rooms with a local member).
        self._delivered: dict[str, int] = {}
        # The same for every DM subject this gateway saw (its DM subscription is global).
        self._dm_delivered: OrderedDict[str, int] = OrderedDict()
        # Messages this gateway just published, by Nats-Msg-Id: (payload, message). Their
        # live copy is then not decoded again (decoding is the costliest step per message).
        self._published: OrderedDict[str, tuple[bytes, ChatEvent]] = OrderedDict()
        # The shared reconnect replay's logs follow the live messages (replay_cache.py).
        self.replay_log: SharedReplay | None = None
        # Where presence transitions go (gateway/scope.py); None: to every socket.
        self.presence_sink: Callable[[str, bool], None] | None = None
        # Room and DM messages reach the sockets in stream order (gateway/ordering.py).
        self._order = StreamOrder(self._subscriptions)

    def _subscriptions(self) -> Iterable[Subscription]:
        """Where live messages may wait before being filed in StreamOrder: nowhere on the
        services' client (its subscribe_handler files each as it is read)."""
        if not queues_messages(self.nc):
            return
        for group in self._room_subs.values():
            yield from group
        yield from self._global_subs

    def _in_order(self, handle: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], None]:
        """A live-message handler that files the message for delivery in stream order
        (called as the message is read: chatlib.nats_client.subscribe_handler)."""

        def callback(msg: Msg) -> None:
            try:
                seq = int((msg.headers or {}).get(names.HEADER_SEQUENCE, "0"))
            except ValueError:
                seq = 0  # _on_chat logs and drops it
            self._order.file(seq, lambda: handle(msg))

        return callback

    def published(self, msg_id: str, payload: bytes, chat: ChatEvent) -> None:
        self._published[msg_id] = (payload, chat)
        if len(self._published) > PUBLISHED_MAX:
            self._published.popitem(last=False)

    def forget(self, msg_id: str, payload: bytes) -> None:
        """A publish JetStream dropped as a duplicate: its live copy never comes."""
        mine = self._published.get(msg_id)
        if mine is not None and mine[0] == payload:
            del self._published[msg_id]

    async def start(self) -> None:
        # DMs: one gateway-wide subscription each (not four per user): a hello then costs
        # no NATS subscription for the user, and a socket no subscription tasks. Every
        # gateway sees every DM; one that has no local participant drops it undecoded.
        self._order.start()
        self._global_subs = [
            await self.nc.subscribe(names.PRESENCE_EVENTS_ALL, cb=self._on_presence),
            await subscribe_handler(
                self.nc, names.live_subject(names.DM_ALL), self._in_order(self._on_live_dm)
            ),
            await self.nc.subscribe(names.TYPING_DM_ALL, cb=self._on_typing_dm),
        ]

    # --- membership ---------------------------------------------------------------------
    async def add(self, session: Session, rooms: Iterable[str]) -> None:
        self.sessions.add(session)
        self.user_sessions.setdefault(session.user, set()).add(session)
        for room in rooms:
            await self.join(session, room)

    async def remove(self, session: Session) -> None:
        for room in list(session.rooms):
            await self.leave(session, room)
        self.sessions.discard(session)
        users = self.user_sessions.get(session.user)
        if users is not None:
            users.discard(session)
            if not users:
                del self.user_sessions[session.user]

    async def join(self, session: Session, room: str) -> None:
        session.rooms.add(room)
        self.room_members.setdefault(room, set()).add(session)
        if room in self._room_subs:
            # Subscribed, or being subscribed: the SUB is already in the NATS connection's
            # outgoing buffer (nats-py queues it before its first await), so anything this
            # session asks NATS next is answered after the subscription is in place.
            return
        pending: list[Subscription] = []
        self._room_subs[room] = pending
        subs = await self._subscribe_room(room)
        if self._room_subs.get(room) is pending:
            pending.extend(subs)
        else:  # everyone left while we subscribed
            for sub in subs:
                await _unsubscribe(sub)

    async def leave(self, session: Session, room: str) -> None:
        session.rooms.discard(room)
        members = self.room_members.get(room)
        if members is None:
            return
        members.discard(session)
        if not members:
            del self.room_members[room]
            self._delivered.pop(names.room_subject(room), None)
            if self.replay_log is not None:
                self.replay_log.dropped(names.room_subject(room))
            for sub in self._room_subs.pop(room, []):
                await _unsubscribe(sub)

    async def _subscribe_room(self, room: str) -> list[Subscription]:
        async def on_live(msg: Msg) -> None:
            await self._on_chat(msg, self._delivered, lambda: self.room_members.get(room, ()))

        async def on_typing(msg: Msg) -> None:
            self._on_typing(msg, self.room_members.get(room, ()))

        live = names.live_subject(names.room_subject(room))
        return [
            await subscribe_handler(self.nc, live, self._in_order(on_live)),
            await self.nc.subscribe(names.typing_room_subject(room), cb=on_typing),
        ]

    def _dm_targets(self, subject: str) -> list[Session]:
        """Local sessions of both participants of a DM subject (...dm.<lo>.<hi>)."""
        parts = subject.rsplit(".", 2)
        if len(parts) != 3:
            return []
        found: list[Session] = []
        for user in (parts[1], parts[2]):
            found.extend(self.user_sessions.get(user, ()))
        return found

    async def _on_live_dm(self, msg: Msg) -> None:
        subject = msg.subject.removeprefix(names.LIVE_PREFIX + ".")
        if subject in self._dm_delivered:
            self._dm_delivered.move_to_end(subject)
        if self._dm_targets(subject) or (
            self.replay_log is not None and self.replay_log.wants_dm()
        ):
            await self._on_chat(msg, self._dm_delivered, lambda: self._dm_targets(subject))
        else:
            # Nobody here takes part, but keep the position: if a participant connects
            # later, a gap check against an old position would replay what it has.
            try:
                self._dm_delivered[subject] = int(
                    (msg.headers or {}).get(names.HEADER_SEQUENCE, "0")
                )
            except ValueError:
                return
        while len(self._dm_delivered) > DM_DELIVERED_MAX:
            self._dm_delivered.popitem(last=False)

    async def _on_typing_dm(self, msg: Msg) -> None:
        targets = self._dm_targets(msg.subject)
        if targets:
            self._on_typing(msg, targets)

    # --- incoming -----------------------------------------------------------------------
    async def _on_chat(
        self,
        msg: Msg,
        delivered_on: MutableMapping[str, int],
        targets: Callable[[], Iterable[Session]],
    ) -> None:
        headers = msg.headers or {}
        try:
            seq = int(headers.get(names.HEADER_SEQUENCE, "0"))
            previous = int(headers.get(names.HEADER_LAST_SEQUENCE, "0"))
            mine = self._published.pop(headers.get(names.HEADER_MSG_ID, ""), None)
            if mine is not None and mine[0] == msg.data:
                chat = mine[1]  # the very bytes we published (a retry's could differ)
            else:
                # A message, or an edit, delete or reaction (chatlib.message_events).
                chat = message_events.decode_chat(msg.data, headers)
        except (ValueError, codec.DecodeError) as exc:
            log.warning("undecodable live message on %s: %s", msg.subject, exc)
            return
        subject = msg.subject.removeprefix(names.LIVE_PREFIX + ".")
        delivered = delivered_on.get(subject)
        if delivered is not None:
            if seq <= delivered:
                return  # already delivered (refilled earlier)
            if previous > delivered:
                await self._refill(subject, delivered, previous, targets)
        delivered_on[subject] = seq
        if self.replay_log is not None:
            self.replay_log.live(subject, previous, seq, chat)
        self._fan_out(seq, chat, targets())
        metrics.FANOUT_LATENCY.observe(max(0.0, time.time() - chat.ts_ms / 1000))

    async def _refill(
        self, subject: str, after: int, upto: int, targets: Callable[[], Iterable[Session]]
    ) -> None:
        log.warning("live gap on %s: refilling %d..%d from the log", subject, after + 1, upto)
        metrics.GAP_REFILLS.inc()
        try:
            missed = await recovery.read_range(self.js, [subject], after + 1, upto)
        except Exception as exc:  # clients still recover on their next reconnect
            log.error("gap refill on %s failed: %s", subject, exc)
            return
        missed = message_events.honour_deletes(missed)
        for seq in sorted(missed):
            self._fan_out(seq, missed[seq], targets())

    def _fan_out(self, seq: int, chat: ChatEvent, targets: Iterable[Session]) -> None:
        rendered = self._recent.get(seq)
        if rendered is None:
            rendered = frames.MessageFrames(chat, seq)
            self._recent[seq] = rendered
            if len(self._recent) > 256:
                self._recent.popitem(last=False)
        for session in list(targets):
            session.deliver_live(seq, rendered.for_user(session.user))

    def _on_typing(self, msg: Msg, targets: Iterable[Session]) -> None:
        try:
            typing = codec.decode_as(pb.Typing, msg.data, msg.headers)
        except codec.DecodeError as exc:
            log.warning("undecodable typing event: %s", exc)
            return
        if typing.room:
            frame = frames.dumps({"type": "typing", "room": typing.room, "user": typing.user})
        else:
            frame = frames.dumps({"type": "typing", "from": typing.user})
        for session in list(targets):
            # Typing is ephemeral: a session still answering hello simply misses it.
            if session.user != typing.user and session.live_buffer is None:
                session.push(frame)

    async def _on_presence(self, msg: Msg) -> None:
        declared = (msg.headers or {}).get(names.HEADER_TYPE)
        online = declared == _USER_ONLINE
        # Every gateway reads every transition: the hand-written reader first (None for
        # anything but the canonical encoding, which the codec then judges).
        fast = (
            presence_wire.parse_user_event(msg.data)
            if online or declared == _USER_OFFLINE
            else None
        )
        if fast is not None:
            user = fast[0]
        else:
            try:
                event = codec.decode(msg.data, msg.headers)
            except codec.DecodeError as exc:
                log.warning("undecodable presence event: %s", exc)
                return
            if not isinstance(event, pb.UserOnline | pb.UserOffline):
                return
            user, online = event.user, isinstance(event, pb.UserOnline)
        if self.presence_sink is not None:
            self.presence_sink(user, online)
            return
        self.broadcast(frames.dumps({"type": "presence", "user": user, "online": online}))

    def broadcast(self, frame: str) -> None:
        for session in list(self.sessions):
            if session.live_buffer is None:
                session.push(frame)

    async def stop(self) -> None:
        subs = [s for group in self._room_subs.values() for s in group]
        for sub in [*subs, *self._global_subs]:
            await _unsubscribe(sub)
        self._room_subs.clear()
        self._global_subs.clear()
        await self._order.stop()


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # a closed connection has no subscriptions left anyway
        log.debug("unsubscribe failed: %s", exc)
