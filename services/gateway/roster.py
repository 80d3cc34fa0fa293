"""What a gateway knows to scope presence: who is a member of which room, and who is online.

Membership lives in the `members` KV bucket (key <room>.<user>): a gateway writes it when
one of its sockets joins a room and deletes it on an explicit `leave` (a disconnect keeps
it: members stay members while offline). Every gateway mirrors the whole bucket with one
KV watch, so there is no singleton and nothing to rebuild after a crash: a new gateway
loads the bucket and follows it. The lobby is never written: everyone is in it, so its
members are the users online.

The online set follows the presence events (the gateway's one presence.event.>
subscription) and is re-read from presence's `who` every `online_resync_interval`
seconds, which repairs anything missed while this gateway's NATS connection was down.

Cost: each gateway holds every membership (about 150 bytes each) and receives every
membership change once; nothing here is per socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from chatlib import names, presence_client
from chatlib.js_publisher import JetStreamPublisher
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from gateway.frames import LOBBY
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# Called with (room, user) when a membership this gateway did not know appears.
MemberAdded = Callable[[str, str], None]


class Roster:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        settings: GatewaySettings,
        publisher: JetStreamPublisher | None = None,
    ) -> None:
        self.nc, self.js, self.settings = nc, js, settings
        # Membership writes (two per new user at hello in a busy hour) go through the
        # shared publisher when given: its PubAcks arrive on one subscription, where
        # kv.put makes a request (inbox, future, timer task) per write.
        self.publisher = publisher
        self.members: dict[str, set[str]] = {}  # room -> its members
        self.rooms_of: dict[str, set[str]] = {}  # user -> rooms they are a member of
        self.online: set[str] = set()
        # False until presence answered `who` once: until then `online` is only what the
        # events said since this gateway started.
        self.online_known = False
        self.on_member_added: MemberAdded | None = None
        self._kv: KeyValue | None = None
        self._watcher: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writes: set[asyncio.Task[None]] = set()
        self._during_resync: list[list[tuple[str, bool]]] = []

    # --- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._kv = await self.js.key_value(names.KV_MEMBERS)
        self._watcher = await self._kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(self._follow(loaded), name="roster-watch"))
        await loaded
        await self.resync_online()
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="roster-online"))
        log.info("roster loaded: %d rooms, %d online", len(self.members), len(self.online))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()

    async def _follow(self, loaded: asyncio.Future[None]) -> None:
        assert self._watcher is not None
        async for entry in self._watcher:
            if entry is None:
                if not loaded.done():
                    loaded.set_result(None)
                continue
            room, _, user = entry.key.partition(".")
            if not user:
                continue
            if entry.operation in ("DEL", "PURGE"):
                self._forget(room, user)
            elif self._add(room, user) and loaded.done() and self.on_member_added is not None:
                self.on_member_added(room, user)

    async def _resync_loop(self) -> None:
        while True:
            # Retry soon while presence never answered (it may start after us).
            known = self.online_known
            await asyncio.sleep(self.settings.online_resync_interval if known else 1.0)
            await self.resync_online()

    async def resync_online(self) -> bool:
        """Re-read who is online from presence; False when presence did not answer."""
        # Events that arrive while the pages are read may be newer than them: replay
        # them over the answer.
        during: list[tuple[str, bool]] = []
        self._during_resync.append(during)
        try:
            users = await presence_client.who_all(self.nc, timeout=self.settings.request_timeout)
        except Exception as exc:  # PresenceUnavailable, NATS trouble: events still flow
            log.info("who is online unavailable: %s", exc)
            return False
        finally:
            self._during_resync.remove(during)
        online = set(users)
        for user, is_online in during:
            if is_online:
                online.add(user)
            else:
                online.discard(user)
        self.online = online
        self.online_known = True
        return True

    # --- membership -----------------------------------------------------------------
    def _add(self, room: str, user: str) -> bool:
        members = self.members.setdefault(room, set())
        if user in members:
            return False
        members.add(user)
        self.rooms_of.setdefault(user, set()).add(room)
        return True

    def _forget(self, room: str, user: str) -> None:
        members = self.members.get(room)
        if members is not None:
            members.discard(user)
            if not members:
                del self.members[room]
        rooms = self.rooms_of.get(user)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self.rooms_of[user]

    def joined(self, room: str, user: str) -> None:
        """A socket of `user` joined `room`: record the membership unless it is known."""
        if room == LOBBY or user in self.members.get(room, ()):
            return
        # Known at once here (the watch confirms it); the write goes on in the background.
        self._add(room, user)
        self._spawn(self._put(room, user))
        if self.on_member_added is not None:
            self.on_member_added(room, user)

    def left(self, room: str, user: str) -> None:
        """An explicit leave: no longer a member."""
        if room == LOBBY:
            return
        self._forget(room, user)
        self._spawn(self._delete(room, user))

    async def _put(self, room: str, user: str) -> None:
        assert self._kv is not None
        key = names.member_key(room, user)
        try:
            if self.publisher is not None:
                subject = names.kv_subject(names.KV_MEMBERS, key)
                await self.publisher.publish(subject, b"1")
            else:
                await self._kv.put(key, b"1")
        except Exception as exc:  # the next join records it again
            log.warning("membership %s/%s not recorded: %s", room, user, exc)

    async def _delete(self, room: str, user: str) -> None:
        assert self._kv is not None
        try:
            await self._kv.delete(names.member_key(room, user))
        except Exception as exc:
            log.warning("membership %s/%s not removed: %s", room, user, exc)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    # --- questions ------------------------------------------------------------------
    def size(self, room: str) -> int:
        if room == LOBBY:
            return len(self.online)
        return len(self.members.get(room, ()))

    def pushes_presence(self, room: str) -> bool:
        """Small rooms push their members' presence; big ones are paged on demand."""
        return self.size(room) <= self.settings.presence_room_max

    def member_list(self, room: str) -> list[str]:
        if room == LOBBY:
            return sorted(self.online)
        return sorted(self.members.get(room, ()))

    def set_online(self, user: str, online: bool) -> None:
        for during in self._during_resync:
            during.append((user, online))
        if online:
            self.online.add(user)
        else:
            self.online.discard(user)
