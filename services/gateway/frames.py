"""The WebSocket protocol v1 (README, "WebSocket protocol v1"): parsing client frames,
building server ones.

Pure functions, no I/O. Server frames are built as JSON text once and shared by every
socket that receives them.
"""

from __future__ import annotations

from typing import Any

import orjson
from chatlib import validate
from chatlib.message_events import ChatEvent
from chatlib.proto.chat import v1 as pb

VERSION = 1
LOBBY = "lobby"
MAX_CLIENT_ID = 64

# Close codes (documented in the README, "Close codes").
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TOO_SLOW = 4008
CLOSE_UNAUTHORIZED = 4401

CLIENT_TYPES = {"hello", "join", "leave", "send", "dm", "history", "typing", "ping"}
CLIENT_TYPES |= {"members", "watch"}  # scoped presence (gateway/members.py)
CLIENT_TYPES |= {"edit", "delete", "react", "search"}  # message lifecycle (issue 14)
CLIENT_TYPES.add("auth")  # #17: a fresh token on a live socket (gateway.reauth)
CLIENT_TYPES |= {"read", "rooms", "threads"}  # user state (gateway/userstate.py)
# Frame types that cost a rate-limit token: the ones that make others (NATS, the archive,
# other clients) do work. Writes and reads have a bucket each (settings rate_* and
# read_rate_*), so paging back through history never costs the budget for sending and a
# burst of sends never blocks reading. join/leave are reads: each can (un)subscribe on
# NATS, and a client joins its rooms in a burst after connecting.
WRITE_LIMITED_TYPES = {"send", "dm", "typing"}
WRITE_LIMITED_TYPES |= {"edit", "delete", "react"}  # issue 14
READ_LIMITED_TYPES = {"history", "join", "leave"}
READ_LIMITED_TYPES |= {"members", "watch"}
READ_LIMITED_TYPES |= {"search"}  # issue 14
READ_LIMITED_TYPES.add("auth")  # verifying may fetch the provider's keys
READ_LIMITED_TYPES |= {"read", "rooms", "threads"}
RATE_LIMITED_TYPES = WRITE_LIMITED_TYPES | READ_LIMITED_TYPES


class FrameError(Exception):
    """A client frame we refuse; becomes an error frame, the connection goes on."""

    def __init__(self, code: str, message: str, ref: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.ref = code, message, ref


def dumps(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def error(code: str, message: str, ref: str = "") -> str:
    frame = {"type": "error", "code": code, "message": message}
    if ref:
        frame["ref"] = ref
    return dumps(frame)


def parse(raw: str | bytes) -> dict[str, Any]:
    """A JSON object with a known string "type"; FrameError otherwise."""
    try:
        frame = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FrameError("bad_json", f"frame is not valid JSON: {exc}") from exc
    if not isinstance(frame, dict):
        raise FrameError("bad_json", "frame must be a JSON object")
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise FrameError("bad_frame", 'frame has no string "type"')
    if kind not in CLIENT_TYPES:
        raise FrameError("unknown_type", f"unknown frame type {kind!r}", kind[:64])
    return frame


def room_of(frame: dict[str, Any], ref: str = "") -> str:
    room = frame.get("room")
    if not validate.is_valid_name(room):
        raise FrameError("bad_room", f"room name must be {validate.NAME_RULE}", ref)
    assert isinstance(room, str)
    return room


def user_of(frame: dict[str, Any], key: str, ref: str = "") -> str:
    user = frame.get(key)
    if not validate.is_valid_name(user):
        raise FrameError("bad_user", f"user name must be {validate.NAME_RULE}", ref)
    assert isinstance(user, str)
    return user


def client_id_of(frame: dict[str, Any]) -> str:
    cid = frame.get("client_id")
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CLIENT_ID:
        raise FrameError("bad_frame", f"client_id must be a string of 1-{MAX_CLIENT_ID} chars")
    return cid


def content_of(frame: dict[str, Any], max_bytes: int, ref: str) -> str:
    content = frame.get("content")
    if not isinstance(content, str) or not content.strip():
        raise FrameError("bad_frame", "content must be a non-empty string", ref)
    if len(content.encode()) > max_bytes:
        raise FrameError("content_too_large", f"content is over {max_bytes} bytes", ref)
    return content


def message_object(msg: pb.ChatMessage, seq: int | None, with_client_id: bool) -> dict[str, Any]:
    """A message as the protocol shows it (without "type"); history pages carry no seq."""
    obj: dict[str, Any] = {"id": msg.id}
    if seq is not None:
        obj["seq"] = seq
    if msg.room:
        obj["room"] = msg.room
    else:
        obj["to"] = msg.dm_peer
    obj.update(sender=msg.sender, content=msg.content, ts=msg.ts_ms)
    if with_client_id and msg.client_id:
        obj["client_id"] = msg.client_id
    if msg.reply_to:
        obj["reply_to"] = msg.reply_to
    return obj


class MessageFrames:
    """The two renderings of one message (or edit, delete, reaction: see
    gateway.lifecycle_frames): for the sender's sessions (with client_id) and for
    everyone else. Each is built at most once, however many sockets receive it."""

    __slots__ = ("_others", "_own", "msg", "seq")

    def __init__(self, msg: ChatEvent, seq: int) -> None:
        self.msg, self.seq = msg, seq
        self._own: str | None = None
        self._others: str | None = None

    def for_user(self, user: str) -> str:
        if not isinstance(self.msg, pb.ChatMessage):
            from gateway.lifecycle_frames import event_frame

            own = user == self.msg.sender
            if own and self._own is None:
                self._own = event_frame(self.msg, self.seq, True)
            if not own and self._others is None:
                self._others = event_frame(self.msg, self.seq, False)
            return (self._own if own else self._others) or ""
        if user == self.msg.sender:
            if self._own is None:
                self._own = dumps({"type": "message", **message_object(self.msg, self.seq, True)})
            return self._own
        if self._others is None:
            self._others = dumps({"type": "message", **message_object(self.msg, self.seq, False)})
        return self._others
