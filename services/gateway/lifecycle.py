"""Client frames of the message lifecycle (issue 14): edit, delete, react, search.

Edits, deletes and reactions become events published durably on the changed message's own
subject (chatlib.message_events), acked like a send. Before publishing, the gateway asks
the archive who wrote the message (chat.history.message): only its author edits, only its
author or an operator deletes, only someone who can see it reacts; anything else is
`forbidden` and nothing is published. The archive checks again when it applies the event,
so a forged event published straight onto NATS changes nothing either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from chatlib import codec, ids, names
from chatlib.message_events import EMOJI, EMOJI_SET
from chatlib.proto.chat import v1 as pb
from nats.micro.request import ERROR_CODE_HEADER

from gateway import frames, handlers
from gateway.frames import FrameError
from gateway.handlers import Deps
from gateway.lifecycle_frames import MARK_END, MARK_START
from gateway.session import Session

log = logging.getLogger(__name__)

SEARCH_LIMIT_MAX = 50
SEARCH_QUERY_MAX = 200
# A message just acked may not be in the archive yet: how long a lookup waits for it.
LOOKUP_PATIENCE_S = 3.0


def _message_id_of(frame: dict[str, Any], ref: str) -> str:
    message_id = frame.get("id")
    if not isinstance(message_id, str) or not ids.is_valid_id(message_id):
        raise FrameError("bad_frame", '"id" must be a message id', ref)
    return message_id


async def lookup(deps: Deps, message_id: str, user: str, ref: str) -> pb.MessageInfo:
    """The archive's facts about a message; `not_found` when it has none (after waiting a
    moment for one that is still on its way), `lookup_unavailable` when it cannot say."""
    payload, headers = codec.encode(pb.MessageLookup(message_id=message_id, requester=user))
    deadline = time.monotonic() + LOOKUP_PATIENCE_S
    while True:
        try:
            reply = await deps.nc.request(
                names.HISTORY_MESSAGE,
                payload,
                timeout=deps.settings.request_timeout,
                headers=headers,
            )
            if (reply.headers or {}).get(ERROR_CODE_HEADER):
                raise RuntimeError(reply.headers)
            info = codec.decode_as(pb.MessageInfo, reply.data, reply.headers)
        except Exception as exc:  # timeout, no responders, NATS down, a 5xx
            log.info("message lookup failed: %s", exc)
            raise FrameError(
                "lookup_unavailable", "cannot check that message right now; retry", ref
            ) from exc
        if info.found or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    if not info.found:
        raise FrameError("not_found", "no such message", ref)
    return info


def _can_see(info: pb.MessageInfo, session: Session) -> bool:
    if info.room:
        return info.room in session.rooms
    return session.user in (info.dm_lo, info.dm_hi)


def _place(info: pb.MessageInfo, user: str) -> tuple[str, str, str]:
    """(room, dm_peer, subject) of an event by `user` on the message `info` describes."""
    if info.room:
        return info.room, "", names.room_subject(info.room)
    peer = info.dm_hi if user == info.dm_lo else info.dm_lo
    return "", peer, names.dm_subject(user, peer)


async def _target(
    frame: dict[str, Any], session: Session, deps: Deps, deleted_ok: bool = False
) -> tuple[str, pb.MessageInfo]:
    cid = frames.client_id_of(frame)
    message_id = _message_id_of(frame, cid)
    info = await lookup(deps, message_id, session.user, cid)
    if not _can_see(info, session):
        # A message of a room not joined, or of someone else's DM thread: same answer as
        # for a foreign message, so ids reveal nothing.
        raise FrameError("forbidden", "that message is not yours to change", cid)
    if info.deleted and not deleted_ok:
        raise FrameError("not_found", "that message was deleted", cid)
    return cid, info


async def handle_edit(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    cid = frames.client_id_of(frame)
    content = frames.content_of(frame, deps.settings.max_content_bytes, cid)
    cid, info = await _target(frame, session, deps)
    if info.sender != session.user:
        raise FrameError("forbidden", "only its author can edit a message", cid)
    now = int(time.time() * 1000)
    if now - info.ts_ms > deps.settings.edit_window_s * 1000:
        raise FrameError("edit_window_closed", "that message is too old to edit", cid)
    room, peer, subject = _place(info, session.user)
    event = pb.MessageEdit(
        id=ids.new_id(), message_id=info.id, room=room, dm_peer=peer, sender=session.user,
        content=content, ts_ms=now, client_id=cid,
    )  # fmt: skip
    await handlers.send_event(event, subject, session, deps)


async def handle_delete(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    # Deleting a deleted message is harmless (the archive applies deletes idempotently),
    # and it is what a retried delete is: with the same client_id it is acked as a
    # duplicate of the first.
    cid, info = await _target(frame, session, deps, deleted_ok=True)
    as_operator = info.sender != session.user
    if as_operator and not session.operator:
        raise FrameError("forbidden", "only its author or an operator can delete a message", cid)
    room, peer, subject = _place(info, session.user)
    event = pb.MessageDelete(
        id=ids.new_id(), message_id=info.id, room=room, dm_peer=peer, sender=session.user,
        ts_ms=int(time.time() * 1000), client_id=cid, operator=as_operator,
    )  # fmt: skip
    await handlers.send_event(event, subject, session, deps)


async def handle_react(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    cid = frames.client_id_of(frame)
    emoji = frame.get("emoji")
    if emoji not in EMOJI_SET:
        raise FrameError("bad_emoji", f"emoji must be one of {' '.join(EMOJI)}", cid)
    remove = frame.get("remove", False)
    if not isinstance(remove, bool):
        raise FrameError("bad_frame", '"remove" must be true or false', cid)
    cid, info = await _target(frame, session, deps)
    room, peer, subject = _place(info, session.user)
    event = pb.ReactionChange(
        id=ids.new_id(), message_id=info.id, room=room, dm_peer=peer, sender=session.user,
        emoji=str(emoji), removed=remove, ts_ms=int(time.time() * 1000), client_id=cid,
    )  # fmt: skip
    await handlers.send_event(event, subject, session, deps)


async def handle_search(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    query = frame.get("query")
    if not isinstance(query, str) or not query.strip() or len(query) > SEARCH_QUERY_MAX:
        raise FrameError("bad_frame", f"query must be 1-{SEARCH_QUERY_MAX} characters", "search")
    limit = frame.get("limit", 20)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= SEARCH_LIMIT_MAX:
        raise FrameError("bad_frame", f"limit must be 1-{SEARCH_LIMIT_MAX}", "search")
    before = frame.get("before") or ""
    if not isinstance(before, str) or (before and not ids.is_valid_id(before)):
        raise FrameError("bad_frame", "before must be a message id", "search")
    # Scope: the rooms this session has joined (the server keeps no room membership of
    # its own yet) and the user's own DM threads (the archive adds those by name).
    request = pb.SearchRequest(
        requester=session.user, rooms=sorted(session.rooms), query=query, before_id=before,
        limit=limit,
    )  # fmt: skip
    payload, headers = codec.encode(request)
    unavailable = FrameError("search_unavailable", "search is unavailable right now", "search")
    try:
        reply = await deps.nc.request(
            names.HISTORY_SEARCH, payload, timeout=deps.settings.request_timeout, headers=headers
        )
    except Exception as exc:
        log.info("search request failed: %s", exc)
        raise unavailable from exc
    code = (reply.headers or {}).get(ERROR_CODE_HEADER)
    if code == "400":
        raise FrameError("bad_frame", "the search service refused the request", "search")
    if code:
        raise unavailable
    try:
        page = codec.decode_as(pb.SearchPage, reply.data, reply.headers)
    except codec.DecodeError as exc:
        raise unavailable from exc
    results = []
    for hit in page.hits:
        if hit.message is None:
            continue
        obj = frames.message_object(hit.message, None, hit.message.sender == session.user)
        obj["snippet"] = hit.snippet
        results.append(obj)
    session.push(
        frames.dumps(
            {
                "type": "search",
                "query": query,
                "results": results,
                "has_more": page.has_more,
                "marks": [MARK_START, MARK_END],
            }
        )
    )
