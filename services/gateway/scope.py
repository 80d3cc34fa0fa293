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
"""

from __future__ import annotations

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
        self._push(targets, presence_frame(user, online))

    def member_added(self, room: str, user: str) -> None:
        """A new member of a room: its local members see them online, if they are."""
        local = self.hub.room_members.get(room)
        if local and user in self.roster.online and self.roster.pushes_presence(room):
            self._push(local, presence_frame(user, True))

    def _push(self, targets: Iterable[Session], frame: str) -> None:
        for session in targets:
            # Presence is a state: a session still answering hello gets it in welcome.
            if session.live_buffer is None:
                session.push(frame)

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
                seen.update(u for u in self.roster.members.get(room, ()) if u in online)
        seen.discard(session.user)
        bounded = sorted(seen)[: max(0, self.settings.welcome_online_max - 1)]
        return sorted([session.user, *bounded])

    # --- watching ---------------------------------------------------------------------
    def set_watch(self, session: Session, users: Iterable[str]) -> None:
        self.forget(session)
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
