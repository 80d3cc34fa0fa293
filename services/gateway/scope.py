"""Scoped presence: a socket hears about the users it has reason to see, and only them.

Those are the members of the rooms it joined (while a room is small: at most
`presence_room_max` members; a bigger room's members are paged with `members` instead of
pushed) and the users it watches: the `watch` list it sent (at most `watch_max`) plus
the peers it exchanged DMs with on this connection.

Cost model (README, "Guarantees and their bounds"): every gateway receives each
online/offline transition once (one presence.event.> subscription, decoded once), and
sends it as a frame only to its local sockets that share a small room with the user or
watch them. A user coming online therefore costs sum(local members of their small
rooms) + watchers frames, independent of how many users are online in total.

Batching: a socket that said `"presence_batch": true` in its hello gets its changes
gathered for up to `presence_batch_ms` and sent as one `presence_batch` frame (online and
offline lists) instead of one `presence` frame each: when many users come online at once
(a busy hour, a reconnect storm) a socket then costs one write per interval, not one per
user. A user whose state flips while a batch is pending ends that batch early, so every
transition still reaches the socket once, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from gateway import frames
from gateway.fanout import Hub
from gateway.frames import LOBBY, FrameError
from gateway.roster import Roster
from gateway.session import Session
from gateway.settings import GatewaySettings


class PresenceScope:
    def __init__(self, hub: Hub, roster: Roster, settings: GatewaySettings) -> None:
        self.hub, self.roster, self.settings = hub, roster, settings
        # user -> local sessions watching them (explicitly or as a DM peer).
        self.watchers: dict[str, set[Session]] = {}
        # session -> the users it watches (kept here: Session is shared and slotted).
        self.watching: dict[Session, set[str]] = {}
        # Sessions that take `presence_batch` frames, and their changes not sent yet
        # (user -> online), flushed together every presence_batch_ms.
        self.batched: set[Session] = set()
        self._pending: dict[Session, dict[str, bool]] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        roster.on_member_added = self.member_added
        hub.presence_sink = self.transition

    # --- who hears what -------------------------------------------------------------
    def audience(self, user: str, in_lobby: bool) -> set[Session]:
        """Local sessions that should hear about `user`'s presence: watchers, and local
        members of the small rooms the user is a member of (the lobby's members are the
        users online, so the lobby counts when `in_lobby`)."""
        targets: set[Session] = set(self.watchers.get(user, ()))
        rooms = [*self.roster.rooms_of.get(user, ())]
        if in_lobby:
            rooms.append(LOBBY)
        for room in rooms:
            local = self.hub.room_members.get(room)
            if local and self.roster.pushes_presence(room):
                targets.update(local)
        return targets

    def transition(self, user: str, online: bool) -> None:
        """An online/offline event from presence (exactly one per transition)."""
        was_online = user in self.roster.online
        self.roster.set_online(user, online)
        targets = self.audience(user, in_lobby=online or was_online)
        self._push(targets, user, online)

    def member_added(self, room: str, user: str) -> None:
        """A new member of a room: its local members see them online, if they are."""
        local = self.hub.room_members.get(room)
        if local and user in self.roster.online and self.roster.pushes_presence(room):
            self._push(local, user, True)

    def _push(self, targets: Iterable[Session], user: str, online: bool) -> None:
        frame = ""  # rendered once, for the first session that takes single frames
        batched, pending_of = self.batched, self._pending
        for session in targets:
            # Presence is a state: a session still answering hello gets it in welcome.
            if session.live_buffer is not None:
                continue
            if session in batched:
                # _add_to_batch, inlined: this runs once per change per audience member
                # (a hundred per user coming online in rooms of a hundred).
                pending = pending_of.get(session)
                if pending is None:
                    pending_of[session] = {user: online}
                elif pending.get(user, online) != online:
                    self._add_to_batch(session, user, online)  # a flip: the slow path
                else:
                    pending[user] = online
                continue
            if not frame:
                frame = presence_frame(user, online)
            session.push(frame)
        if pending_of and self._flush_timer is None:
            self._start_flush_timer()

    # --- batching ---------------------------------------------------------------------
    def batch(self, session: Session) -> None:
        """The session takes `presence_batch` frames (it opted in at hello)."""
        self.batched.add(session)

    def _add_to_batch(self, session: Session, user: str, online: bool) -> None:
        pending = self._pending.get(session)
        if pending is None:
            pending = self._pending[session] = {}
        elif pending.get(user, online) != online:
            # A flip within one interval: send what is pending first, keep both.
            self._send_batch(session, pending)
            pending = self._pending[session] = {}
        pending[user] = online
        if self._flush_timer is None:
            self._start_flush_timer()

    def _start_flush_timer(self) -> None:
        delay = self.settings.presence_batch_ms / 1000
        self._flush_timer = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        """Send every pending batch (one frame per session)."""
        self._flush_timer = None
        pending, self._pending = self._pending, {}
        for session, changes in pending.items():
            self._send_batch(session, changes)

    @staticmethod
    def _send_batch(session: Session, changes: dict[str, bool]) -> None:
        if changes and not session.closing:
            session.push(batch_frame(changes))

    # --- welcome ----------------------------------------------------------------------
    def welcome_online(self, session: Session) -> list[str]:
        """Who of the users this session may see is online: itself, its watch list, the
        members of its small rooms; at most welcome_online_max names (sorted, itself
        first kept), the rest are paged with `members`."""
        online = self.roster.online
        seen: set[str] = {u for u in self.watching.get(session, ()) if u in online}
        for room in session.rooms:
            if not self.roster.pushes_presence(room):
                continue
            if room == LOBBY:
                seen.update(online)
            else:
                # Set intersection runs in C over the smaller set (a room's members):
                # this is per hello, for each of the user's rooms.
                members = self.roster.members.get(room)
                if members:
                    seen |= members & online
        seen.discard(session.user)
        bounded = sorted(seen)[: max(0, self.settings.welcome_online_max - 1)]
        return sorted([session.user, *bounded])

    # --- watching ---------------------------------------------------------------------
    def set_watch(self, session: Session, users: Iterable[str]) -> None:
        self._unwatch(session)
        for user in users:
            self.watch(session, user)

    def watch(self, session: Session, user: str) -> bool:
        """Watch one more user; False when the session's watch list is full."""
        mine = self.watching.setdefault(session, set())
        if user in mine:
            return True
        if len(mine) >= self.settings.watch_max:
            return False
        mine.add(user)
        self.watchers.setdefault(user, set()).add(session)
        return True

    def forget(self, session: Session) -> None:
        """The session is gone."""
        self._unwatch(session)
        self.batched.discard(session)
        self._pending.pop(session, None)

    def _unwatch(self, session: Session) -> None:
        for user in self.watching.pop(session, set()):
            watchers = self.watchers.get(user)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del self.watchers[user]

    def joined(self, session: Session, room: str) -> None:
        self.roster.joined(room, session.user)

    def left(self, session: Session, room: str) -> None:
        self.roster.left(room, session.user)


def presence_frame(user: str, online: bool) -> str:
    return frames.dumps({"type": "presence", "user": user, "online": online})


def batch_frame(changes: dict[str, bool]) -> str:
    """Several users' changes in one frame (sorted, each user once)."""
    online = sorted([u for u, is_online in changes.items() if is_online])
    offline = sorted([u for u, is_online in changes.items() if not is_online])
    return frames.dumps({"type": "presence_batch", "online": online, "offline": offline})


def watch_list(value: Any, limit: int, ref: str) -> list[str]:
    """A client's watch list: distinct valid user names, at most `limit`."""
    if not isinstance(value, list):
        raise FrameError("bad_frame", "watch must be a list of user names", ref)
    users: list[str] = []
    for user in value:
        frames.user_of({"user": user}, "user", ref)
        if user not in users:
            users.append(user)
    if len(users) > limit:
        raise FrameError("watch_too_large", f"watch at most {limit} users", ref)
    return users
