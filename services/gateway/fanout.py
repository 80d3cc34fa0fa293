"""Live fan-out from NATS to local sockets.

A gateway subscribes (core NATS) only to what its users need: live.chat.room.<room> and
typing.room.<room> while the room has a local member, and each local user's DM wildcards
while the user has a local session. Subscriptions are reference-counted. Each message is
decoded once and rendered once (frames.MessageFrames); sockets get the same text.

Gaps: each live message carries Nats-Last-Sequence, the previous seq on its subject. If
that is above the last seq this subscription delivered on the subject (messages went by
while our NATS connection was down), the missing ones are read from the CHAT stream and
delivered first, so members still see the room's order with nothing missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from chatlib import codec, names
from chatlib.proto.chat import v1 as pb
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from gateway import frames, metrics, recovery
from gateway.session import Session

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self.nc, self.js = nc, js
        self.sessions: set[Session] = set()
        self.room_members: dict[str, set[Session]] = {}
        self.user_sessions: dict[str, set[Session]] = {}
        self._room_subs: dict[str, list[Subscription]] = {}
        self._user_subs: dict[str, list[Subscription]] = {}
        self._presence_sub: Subscription | None = None
        self._lock = asyncio.Lock()
        # A DM between two local users arrives once per user subscription: render it once.
        self._recent: OrderedDict[int, frames.MessageFrames] = OrderedDict()
        # (subscription owner, chat subject) -> last seq delivered, for gap detection.
        self._delivered: dict[tuple[str, str], int] = {}

    async def start(self) -> None:
        self._presence_sub = await self.nc.subscribe(
            names.PRESENCE_EVENTS_ALL, cb=self._on_presence
        )

    # --- membership ---------------------------------------------------------------------
    async def add(self, session: Session, rooms: Iterable[str]) -> None:
        async with self._lock:
            self.sessions.add(session)
            users = self.user_sessions.setdefault(session.user, set())
            users.add(session)
            if session.user not in self._user_subs:
                self._user_subs[session.user] = await self._subscribe_user(session.user)
        for room in rooms:
            await self.join(session, room)

    async def remove(self, session: Session) -> None:
        for room in list(session.rooms):
            await self.leave(session, room)
        async with self._lock:
            self.sessions.discard(session)
            users = self.user_sessions.get(session.user)
            if users is not None:
                users.discard(session)
                if not users:
                    del self.user_sessions[session.user]
                    self._forget(f"user:{session.user}")
                    for sub in self._user_subs.pop(session.user, []):
                        await _unsubscribe(sub)

    async def join(self, session: Session, room: str) -> None:
        async with self._lock:
            session.rooms.add(room)
            members = self.room_members.setdefault(room, set())
            members.add(session)
            if room not in self._room_subs:
                self._room_subs[room] = await self._subscribe_room(room)

    async def leave(self, session: Session, room: str) -> None:
        async with self._lock:
            session.rooms.discard(room)
            members = self.room_members.get(room)
            if members is None:
                return
            members.discard(session)
            if not members:
                del self.room_members[room]
                self._forget(f"room:{room}")
                for sub in self._room_subs.pop(room, []):
                    await _unsubscribe(sub)

    async def _subscribe_room(self, room: str) -> list[Subscription]:
        async def on_live(msg: Msg) -> None:
            await self._on_chat(msg, f"room:{room}", lambda: self.room_members.get(room, ()))

        async def on_typing(msg: Msg) -> None:
            self._on_typing(msg, self.room_members.get(room, ()))

        live = names.live_subject(names.room_subject(room))
        return [
            await self.nc.subscribe(live, cb=on_live),
            await self.nc.subscribe(names.typing_room_subject(room), cb=on_typing),
        ]

    async def _subscribe_user(self, user: str) -> list[Subscription]:
        async def on_live(msg: Msg) -> None:
            await self._on_chat(msg, f"user:{user}", lambda: self.user_sessions.get(user, ()))

        async def on_typing(msg: Msg) -> None:
            self._on_typing(msg, self.user_sessions.get(user, ()))

        subs = [
            await self.nc.subscribe(names.live_subject(s), cb=on_live)
            for s in names.dm_subjects_of(user)
        ]
        subs += [
            await self.nc.subscribe(s, cb=on_typing) for s in names.typing_dm_subjects_of(user)
        ]
        return subs

    # --- incoming -----------------------------------------------------------------------
    async def _on_chat(
        self, msg: Msg, owner: str, targets: Callable[[], Iterable[Session]]
    ) -> None:
        headers = msg.headers or {}
        try:
            seq = int(headers.get(names.HEADER_SEQUENCE, "0"))
            previous = int(headers.get(names.HEADER_LAST_SEQUENCE, "0"))
            chat = codec.decode_as(pb.ChatMessage, msg.data, headers)
        except (ValueError, codec.DecodeError) as exc:
            log.warning("undecodable live message on %s: %s", msg.subject, exc)
            return
        subject = msg.subject.removeprefix(names.LIVE_PREFIX + ".")
        key = (owner, subject)
        delivered = self._delivered.get(key)
        if delivered is not None:
            if seq <= delivered:
                return  # already delivered (refilled earlier)
            if previous > delivered:
                await self._refill(subject, delivered, previous, targets)
        self._delivered[key] = seq
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
        for seq in sorted(missed):
            self._fan_out(seq, missed[seq], targets())

    def _fan_out(self, seq: int, chat: pb.ChatMessage, targets: Iterable[Session]) -> None:
        rendered = self._recent.get(seq)
        if rendered is None:
            rendered = frames.MessageFrames(chat, seq)
            self._recent[seq] = rendered
            if len(self._recent) > 256:
                self._recent.popitem(last=False)
        for session in list(targets):
            session.deliver_live(seq, rendered.for_user(session.user))

    def _forget(self, owner: str) -> None:
        for key in [k for k in self._delivered if k[0] == owner]:
            del self._delivered[key]

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
        try:
            event = codec.decode(msg.data, msg.headers)
        except codec.DecodeError as exc:
            log.warning("undecodable presence event: %s", exc)
            return
        if isinstance(event, pb.UserOnline):
            frame = frames.dumps({"type": "presence", "user": event.user, "online": True})
        elif isinstance(event, pb.UserOffline):
            frame = frames.dumps({"type": "presence", "user": event.user, "online": False})
        else:
            return
        self.broadcast(frame)

    def broadcast(self, frame: str) -> None:
        for session in list(self.sessions):
            if session.live_buffer is None:
                session.push(frame)

    async def stop(self) -> None:
        subs = [s for group in self._room_subs.values() for s in group]
        subs += [s for group in self._user_subs.values() for s in group]
        if self._presence_sub is not None:
            subs.append(self._presence_sub)
        for sub in subs:
            await _unsubscribe(sub)
        self._room_subs.clear()
        self._user_subs.clear()


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # a closed connection has no subscriptions left anyway
        log.debug("unsubscribe failed: %s", exc)
