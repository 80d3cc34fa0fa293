"""Client frames `members` (a room's member list with online flags, paged) and `watch`
(the users whose presence a socket follows besides its rooms' members)."""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

from chatlib import validate

from gateway import frames
from gateway.frames import FrameError
from gateway.scope import PresenceScope, presence_frame, watch_list
from gateway.session import Session

if TYPE_CHECKING:
    from gateway.handlers import Deps


def _scope(deps: Deps) -> PresenceScope:
    scope = deps.scope
    if scope is None:
        raise FrameError("presence_unavailable", "presence is not available on this gateway")
    assert isinstance(scope, PresenceScope)
    return scope


async def handle_members(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    room = frames.room_of(frame, "members")
    if room not in session.rooms:
        raise FrameError("not_joined", f"join {room!r} to see its members", "members")
    page_max = deps.settings.members_page_max
    limit = frame.get("limit", page_max)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= page_max:
        raise FrameError("bad_frame", f"limit must be 1-{page_max}", "members")
    after = frame.get("after") or ""
    if not isinstance(after, str) or (after and not validate.is_valid_name(after)):
        raise FrameError("bad_frame", "after must be a user name", "members")
    scope = _scope(deps)
    everyone = scope.roster.member_list(room)
    start = bisect.bisect_right(everyone, after) if after else 0
    page = everyone[start : start + limit]
    online = scope.roster.online
    more = start + limit < len(everyone)
    session.push(
        frames.dumps(
            {
                "type": "members",
                "room": room,
                "members": [{"user": u, "online": u in online} for u in page],
                "total": len(everyone),
                "next_after": page[-1] if more and page else "",
            }
        )
    )


async def handle_watch(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    users = watch_list(frame.get("users"), deps.settings.watch_max, "watch")
    scope = _scope(deps)
    scope.set_watch(session, users)
    online = scope.roster.online
    # The current state of each watched user; changes follow as presence frames.
    for user in users:
        session.push(presence_frame(user, user in online))
