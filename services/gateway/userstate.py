"""User state on the gateway (issue #13): memberships and read markers as events, the
user's state on hello, the room directory and DM thread list, and the live fan-out of a
user's events to all their sessions.

- join/leave publish a MembershipEvent, read publishes a ReadEvent, to the USERSTATE
  stream (JetStream, Nats-Msg-Id = event id: a retried publish is stored once). The
  archive applies them to Postgres; the stream republishes each to live.user.<user>.<kind>,
  which every gateway hears (one subscription) and hands to that user's sessions, so a
  join or read on one device reaches the others at once.
- hello asks the archive once (chat.userstate.state) for the user's rooms and unread and
  mention counts up to the archive's watermark, then adds the CHAT messages after the
  watermark up to welcome.seq (read from the stream), so the counts are exact whatever
  the archive's lag.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import betterproto2
import nats.js.errors
from chatlib import codec, ids, mentions, names, presence_client, userstate_wire
from chatlib.proto.chat import v1 as pb
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import ERROR_CODE_HEADER

from gateway import frames, recovery
from gateway.fanout import Hub
from gateway.frames import FrameError
from gateway.session import Session

log = logging.getLogger(__name__)

# Counts stop here; the protocol shows UNREAD_CAP as "99+" (see README).
UNREAD_CAP = 100
PAGE_MAX = 200
STATE_TIMEOUT = 2.0


def thread_key(room: str = "", peer: str = "") -> str:
    return f"r:{room}" if room else f"d:{peer}"


# --- publishing events ---------------------------------------------------------------------


async def publish_event(deps: Any, subject: str, event: betterproto2.Message, event_id: str) -> int:
    """Store the event in USERSTATE; returns its stream sequence. Raises FrameError
    state_unavailable when it could not be stored (nothing changed)."""
    payload, headers = codec.encode(event)
    headers[names.HEADER_MSG_ID] = event_id
    try:
        ack = await deps.js.publish(
            subject,
            payload,
            timeout=deps.settings.request_timeout,
            stream=names.STREAM_USERSTATE,
            headers=headers,
        )
    except Exception as exc:
        log.warning("user-state event not stored: %s", exc)
        raise FrameError(
            "state_unavailable", "your state could not be stored right now; retry"
        ) from exc
    return int(ack.seq)


async def store_membership(deps: Any, user: str, room: str, joined: bool) -> None:
    event_id = ids.new_id()
    event = pb.MembershipEvent(
        id=event_id, user=user, room=room, joined=joined, ts_ms=int(time.time() * 1000)
    )
    await publish_event(deps, names.membership_subject(user), event, event_id)


# --- client frames ---------------------------------------------------------------------------


def _seq_of(frame: dict[str, Any], key: str, ref: str, required: bool = True) -> int:
    value = frame.get(key, None if required else 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < (1 if required else 0):
        raise FrameError("bad_frame", f"{key} must be a positive integer (a message's seq)", ref)
    return value


async def handle_read(frame: dict[str, Any], session: Session, deps: Any) -> None:
    """Mark a thread read up to the message with `seq`. Refused, storing nothing: a
    `user` other than yours (forbidden), a room you are not in (not_joined), a seq past
    the end of the log or of another thread (bad_marker)."""
    forged = frame.get("user")
    if forged is not None and forged != session.user:
        raise FrameError("forbidden", "you can only mark your own threads read", "read")
    seq = _seq_of(frame, "seq", "read")
    if "room" in frame:
        room, peer = frames.room_of(frame, "read"), ""
        if room not in session.rooms:
            raise FrameError("not_joined", f"you are not in {room!r}", "read")
        subject = names.room_subject(room)
    elif "with" in frame:
        room, peer = "", frames.user_of(frame, "with", "read")
        if peer == session.user:
            raise FrameError("bad_user", "there is no thread with yourself", "read")
        subject = names.dm_subject(session.user, peer)
    else:
        raise FrameError("bad_frame", 'read needs "room" or "with"', "read")
    message_id = await _check_marker(deps, seq, subject)
    event_id = ids.new_id()
    event = pb.ReadEvent(
        id=event_id,
        user=session.user,
        room=room,
        dm_peer=peer,
        seq=seq,
        ts_ms=int(time.time() * 1000),
        message_id=message_id,
    )
    # Every session of the user (this one too) gets the `read` frame from the live copy.
    await publish_event(deps, names.read_subject(session.user), event, event_id)


async def _check_marker(deps: Any, seq: int, subject: str) -> str:
    """The message at `seq` must exist and belong to the thread (a marker names a
    message of its own thread, never one past the end); returns its id ("" if unknown)."""
    bad = FrameError("bad_marker", "seq is not a message of that thread", "read")
    try:
        stored = await deps.js.get_msg(names.STREAM_CHAT, seq)
    except nats.js.errors.NotFoundError:
        try:
            info = await deps.js.stream_info(names.STREAM_CHAT)
        except Exception as exc:
            raise FrameError("state_unavailable", "cannot check the marker now", "read") from exc
        if seq > info.state.last_seq:
            raise FrameError("bad_marker", "seq is past the end of the log", "read") from None
        return ""  # aged out of the log: it can only be an old (harmless) marker
    except Exception as exc:
        raise FrameError("state_unavailable", "cannot check the marker now", "read") from exc
    if stored.subject != subject:
        raise bad
    try:
        return codec.decode_as(pb.ChatMessage, stored.data or b"", stored.headers).id
    except codec.DecodeError:
        return ""


async def _ask(
    deps: Any, subject: str, request: betterproto2.Message, answer: type, ref: str
) -> Any:
    payload, headers = codec.encode(request)
    unavailable = FrameError("state_unavailable", "user state is unavailable right now", ref)
    try:
        reply = await deps.nc.request(subject, payload, timeout=STATE_TIMEOUT, headers=headers)
    except Exception as exc:
        raise unavailable from exc
    code = (reply.headers or {}).get(ERROR_CODE_HEADER)
    if code == "400":
        raise FrameError("bad_frame", "the request was refused", ref)
    if code:
        raise unavailable
    try:
        return codec.decode_as(answer, reply.data, reply.headers)
    except codec.DecodeError as exc:
        raise unavailable from exc


async def handle_rooms(frame: dict[str, Any], session: Session, deps: Any) -> None:
    """The room directory: rooms by name, with a prefix, paged after a name."""
    prefix = frame.get("prefix", "")
    if not isinstance(prefix, str) or len(prefix) > 32 or (prefix and not _is_prefix(prefix)):
        raise FrameError("bad_room", "prefix must be the start of a room name", "rooms")
    after = frame.get("after", "")
    if after:
        after = frames.room_of({"room": after}, "rooms")
    limit = frame.get("limit", 50)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= PAGE_MAX:
        raise FrameError("bad_frame", f"limit must be 1-{PAGE_MAX}", "rooms")
    request = pb.RoomsRequest(prefix=prefix, after=after, limit=limit)
    page = await _ask(deps, names.USERSTATE_ROOMS, request, pb.RoomsPage, "rooms")
    rooms = [
        {
            "name": r.name,
            "members": r.members,
            "last_ts": r.last_ts_ms or None,
            "joined": r.name in session.rooms,
        }
        for r in page.rooms
    ]
    session.push(frames.dumps({"type": "rooms", "rooms": rooms, "has_more": page.has_more}))


def _is_prefix(prefix: str) -> bool:
    return all(c in "abcdefghijklmnopqrstuvwxyz0123456789_-" for c in prefix)


async def handle_threads(frame: dict[str, Any], session: Session, deps: Any) -> None:
    """The user's DM threads, newest activity first, with each peer's presence."""
    before = _seq_of(frame, "before_seq", "threads", required=False)
    limit = frame.get("limit", 50)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= PAGE_MAX:
        raise FrameError("bad_frame", f"limit must be 1-{PAGE_MAX}", "threads")
    request = pb.ThreadsRequest(user=session.user, before_seq=before, limit=limit)
    page = await _ask(deps, names.USERSTATE_THREADS, request, pb.ThreadsPage, "threads")
    try:
        online: set[str] | None = set(
            await presence_client.who_all(deps.nc, timeout=deps.settings.request_timeout)
        )
    except Exception:
        online = None
    threads = [
        {
            "with": t.dm_peer,
            "last_seq": t.last_seq,
            "last_ts": t.last_ts_ms,
            "read_seq": t.read_seq,
            "online": (t.dm_peer in online) if online is not None else None,
        }
        for t in page.threads
    ]
    session.push(frames.dumps({"type": "threads", "threads": threads, "has_more": page.has_more}))


# --- hello -----------------------------------------------------------------------------------


@dataclass
class HelloState:
    """What the archive said about the user at hello (None fields: it did not answer)."""

    state: Any = None  # userstate_wire.State or pb.UserState (same attribute names)
    problems: list[FrameError] = field(default_factory=list)

    @property
    def rooms(self) -> list[str]:
        return list(self.state.rooms) if self.state is not None else []


async def load_state(deps: Any, user: str, hint_rooms: list[str]) -> HelloState:
    """One request to the archive for the user's rooms and counts (no per-room trips)."""
    request = pb.UserStateRequest(user=user, rooms=hint_rooms, cap=UNREAD_CAP)
    payload, headers = codec.encode(request)
    try:
        # One per hello: through the shared publisher's reply subscription (no inbox,
        # timer and task of its own); it times out after settings.request_timeout.
        reply = await deps.publisher.request(names.USERSTATE_STATE, payload, headers)
    except Exception as exc:  # no archive, NATS trouble: a welcome without counts
        log.info("user state unavailable: %s", exc)
        return HelloState()
    if (reply.headers or {}).get(ERROR_CODE_HEADER):
        return HelloState()
    state: Any = userstate_wire.parse_user_state(reply.data)
    if state is None:  # not the canonical encoding: the codec judges it
        try:
            state = codec.decode_as(pb.UserState, reply.data, reply.headers)
        except codec.DecodeError as exc:
            log.warning("undecodable user state: %s", exc)
            return HelloState()
    return HelloState(state=state)


async def store_hello_rooms(deps: Any, user: str, hello: HelloState, joined: list[str]) -> None:
    """Rooms joined at hello that the server did not hold yet (hello.rooms, the lobby)
    become stored memberships, like a `join`."""
    if hello.state is None:
        return
    stored = set(hello.state.rooms)
    missing = [room for room in joined if room not in stored]
    results = await asyncio.gather(
        *(store_membership(deps, user, room, True) for room in missing), return_exceptions=True
    )
    if any(isinstance(r, Exception) for r in results):
        hello.problems.append(
            FrameError("state_unavailable", "some rooms could not be stored", "hello")
        )


async def welcome_unread(
    deps: Any, user: str, rooms: list[str], hello: HelloState, snapshot: int | None
) -> list[dict[str, Any]] | None:
    """Unread and mention counts per thread, exact up to `snapshot` (welcome.seq): the
    archive's counts up to its watermark plus the CHAT messages after it."""
    state = hello.state
    if state is None or snapshot is None:
        return None
    counts: dict[str, dict[str, Any]] = {}
    markers: dict[str, int] = {}
    for t in state.threads:
        key = thread_key(t.room, t.dm_peer)
        markers[key] = t.read_seq
        entry: dict[str, Any] = {"room": t.room} if t.room else {"with": t.dm_peer}
        entry.update(unread=t.unread, mentions=t.mentions, read_seq=t.read_seq, last_seq=t.last_seq)
        if t.read_id:
            entry["read_id"] = t.read_id
        counts[key] = entry
    through = min(state.archived_through, snapshot)
    if through < snapshot:
        try:
            tail = await _read_tail(deps, user, rooms, through, snapshot)
        except Exception as exc:
            log.warning("cannot read the unarchived tail: %s", exc)
            hello.problems.append(
                FrameError("state_unavailable", "unread counts are unknown", "hello")
            )
            return None
        for seq, msg in sorted(tail.items()):
            peer = "" if msg.room else (msg.dm_peer if msg.sender == user else msg.sender)
            if msg.room and msg.room not in rooms:
                continue
            key = thread_key(msg.room, peer)
            entry = counts.setdefault(
                key,
                {**({"room": msg.room} if msg.room else {"with": peer}), "unread": 0,
                 "mentions": 0, "read_seq": 0, "last_seq": 0},
            )  # fmt: skip
            entry["last_seq"] = max(entry["last_seq"], seq)
            if msg.sender == user or seq <= markers.get(key, 0):
                continue
            entry["unread"] = min(UNREAD_CAP, entry["unread"] + 1)
            if msg.room and user in mentions.mentioned(msg.content):
                entry["mentions"] = min(UNREAD_CAP, entry["mentions"] + 1)
    # DM threads are listed while something in them is unread (as the archive lists
    # them); one it named only for its marker (read past the watermark) is not.
    return [
        e for e in counts.values() if "room" in e or e["unread"] or e["last_seq"] > e["read_seq"]
    ]


async def _read_tail(
    deps: Any, user: str, rooms: list[str], after: int, upto: int
) -> dict[int, pb.ChatMessage]:
    found: dict[int, pb.ChatMessage] = {}
    for subjects in recovery.filter_groups(user, sorted(rooms)):
        events = await recovery.read_range(deps.js, subjects, after + 1, upto)
        # Messages only: edits, deletes and reactions (issue 14) are not unread messages.
        found.update((seq, e) for seq, e in events.items() if isinstance(e, pb.ChatMessage))
    return found


# --- live events to the user's sessions ------------------------------------------------------


class UserEvents:
    """One gateway-wide subscription to live.user.>: a user's events go to their local
    sessions (membership changes also (un)subscribe the room here)."""

    def __init__(self, nc: NATS, hub: Hub) -> None:
        self.nc, self.hub = nc, hub
        self.sub: Subscription | None = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(names.LIVE_USER_ALL, cb=self._on_event)

    async def stop(self) -> None:
        if self.sub is not None:
            try:
                await self.sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe failed: %s", exc)

    async def _on_event(self, msg: Msg) -> None:
        parsed = names.parse_user_subject(msg.subject)
        if parsed is None:
            return
        user, _ = parsed
        sessions = list(self.hub.user_sessions.get(user, ()))
        if not sessions:
            return
        try:
            event = codec.decode(msg.data, msg.headers)
        except codec.DecodeError as exc:
            log.warning("undecodable user-state event on %s: %s", msg.subject, exc)
            return
        if getattr(event, "user", None) != user:
            return
        if isinstance(event, pb.MembershipEvent):
            frame = frames.dumps({"type": "membership", "room": event.room, "joined": event.joined})
            for session in sessions:
                if event.room == frames.LOBBY:
                    continue
                if event.joined:
                    await self.hub.join(session, event.room)
                else:
                    await self.hub.leave(session, event.room)
                _push(session, frame)
        elif isinstance(event, pb.ReadEvent):
            target = {"room": event.room} if event.room else {"with": event.dm_peer}
            read: dict[str, Any] = {"type": "read", **target, "seq": event.seq}
            if event.message_id:
                read["id"] = event.message_id
            frame = frames.dumps(read)
            for session in sessions:
                _push(session, frame)
        elif isinstance(event, pb.MentionEvent):
            frame = frames.dumps(
                {
                    "type": "mention",
                    "room": event.room,
                    "id": event.message_id,
                    "sender": event.sender,
                    "seq": event.seq,
                }
            )
            for session in sessions:
                _push(session, frame)


def _push(session: Session, frame: str) -> None:
    # A session still answering hello gets its state in the welcome instead.
    if session.live_buffer is None:
        session.push(frame)
