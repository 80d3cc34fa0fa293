"""Server frames of the message lifecycle (issue 14): `edit`, `delete`, `reaction` as they
go out live and on replay, and the optional fields history adds to a message. Pure."""

from __future__ import annotations

from typing import Any

import orjson
from chatlib import ids
from chatlib.message_events import Lifecycle
from chatlib.proto.chat import v1 as pb

# What a search snippet marks matches with (archive.search): private-use characters.
MARK_START, MARK_END = "\ue000", "\ue001"


def _where(event: Lifecycle) -> dict[str, str]:
    return {"room": event.room} if event.room else {"to": event.dm_peer}


def event_object(event: Lifecycle, seq: int | None, own: bool) -> dict[str, Any]:
    """An edit, delete or reaction as the protocol shows it. `id` is the message it
    changes (what a client looks up); `event_id` is the event's own id."""
    obj: dict[str, Any]
    if isinstance(event, pb.MessageEdit):
        obj = {"type": "edit", "id": event.message_id, **_where(event), "sender": event.sender}
        obj.update(content=event.content, edited_at=event.ts_ms)
    elif isinstance(event, pb.MessageDelete):
        obj = {"type": "delete", "id": event.message_id, **_where(event), "by": event.sender}
        obj["ts"] = event.ts_ms
    else:
        obj = {"type": "reaction", "id": event.message_id, **_where(event), "user": event.sender}
        obj.update(emoji=event.emoji, added=not event.removed, ts=event.ts_ms)
    obj["event_id"] = event.id
    if seq is not None:
        obj["seq"] = seq
    if own and event.client_id:
        obj["client_id"] = event.client_id
    return obj


def event_frame(event: Lifecycle, seq: int, own: bool) -> str:
    return orjson.dumps(event_object(event, seq, own)).decode()


def state_fields(state: pb.MessageState) -> dict[str, Any]:
    """The optional message fields a history page adds (absent when at their default)."""
    out: dict[str, Any] = {}
    if state.edited_at_ms:
        out["edited_at"] = state.edited_at_ms
    if state.deleted:
        out["deleted"] = True
        out["content"] = ""
    if state.reply_to:
        out["reply_to"] = state.reply_to
    if state.reactions and not state.deleted:
        out["reactions"] = [
            {"emoji": r.emoji, "count": len(r.users), "users": list(r.users)}
            for r in state.reactions
        ]
    return out


def history_options(frame: dict[str, Any]) -> dict[str, str]:
    """The optional `around` / `thread` of a history frame (validated message ids; at most
    one, and not with `before`); echoed in the answer."""
    from gateway.frames import FrameError

    found = {k: frame[k] for k in ("around", "thread") if frame.get(k) is not None}
    for key, value in found.items():
        if not isinstance(value, str) or not ids.is_valid_id(value):
            raise FrameError("bad_frame", f"{key} must be a message id", "history")
    if len(found) > 1 or (found and frame.get("before")):
        raise FrameError("bad_frame", "give one of before, around, thread", "history")
    return found
