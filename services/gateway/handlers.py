"""Client frames -> actions. Plain async functions taking the decoded frame, the session
and the dependencies; every refusal is a FrameError that becomes an error frame."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from chatlib import codec, idempotency, ids, message_events, names
from chatlib.auth import Authenticator
from chatlib.js_publisher import JetStreamPublisher
from chatlib.limits import TokenBucket
from chatlib.message_events import ChatEvent
from chatlib.proto.chat import v1 as pb
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.micro.request import ERROR_CODE_HEADER

from gateway import frames, lifecycle_frames, members, metrics, reauth, userstate
from gateway.fanout import Hub
from gateway.frames import FrameError
from gateway.scope import PresenceScope
from gateway.session import Session
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

HISTORY_LIMIT_MAX = 200


@dataclass
class Deps:
    nc: NATS
    js: JetStreamContext
    hub: Hub
    settings: GatewaySettings
    publisher: JetStreamPublisher  # durable sends (send_event)
    scope: PresenceScope | None = None  # scoped presence (gateway/scope.py)
    auth: Authenticator | None = None  # for `auth` frames (gateway.reauth)


Handler = Callable[[dict[str, Any], Session, Deps], Awaitable[None]]


def frame_size(raw: str | bytes) -> int:
    return len(raw.encode()) if isinstance(raw, str) else len(raw)


async def handle_raw(raw: str | bytes, session: Session, deps: Deps) -> int | None:
    """Handle one client frame after hello. Returns a close code when the client has
    become abusive, else None (errors went to the client as error frames)."""
    max_bytes = deps.settings.max_frame_bytes
    if frame_size(raw) > max_bytes:
        _refuse(session, FrameError("frame_too_large", f"frames are limited to {max_bytes} bytes"))
        return frames.CLOSE_POLICY if session.abuse.violation() else None
    try:
        frame = frames.parse(raw)
    except FrameError as exc:
        metrics.frames_in("invalid").value += 1
        _refuse(session, exc)
        return None
    kind = frame["type"]
    metrics.frames_in(kind).value += 1
    if kind in frames.WRITE_LIMITED_TYPES:
        bucket: TokenBucket | None = session.bucket
    elif kind in frames.READ_LIMITED_TYPES:
        bucket = session.read_bucket
    else:
        bucket = None
    if bucket is not None and not bucket.take():
        metrics.RATE_LIMITED.inc()
        ref = frame.get("client_id") if isinstance(frame.get("client_id"), str) else kind
        _refuse(session, FrameError("rate_limited", "slow down: too many frames", str(ref)[:64]))
        return frames.CLOSE_POLICY if session.abuse.violation() else None
    try:
        await HANDLERS[kind](frame, session, deps)
    except FrameError as exc:
        _refuse(session, exc)
    return None


def _refuse(session: Session, exc: FrameError) -> None:
    metrics.ERRORS.labels(exc.code).inc()
    session.push(frames.error(exc.code, exc.message, exc.ref))


# --- rooms -----------------------------------------------------------------------------
async def handle_join(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    room = frames.room_of(frame, "join")
    problem = None
    if room not in session.rooms:
        try:  # stored first, so the user's other sessions follow (gateway/userstate.py)
            await userstate.store_membership(deps, session.user, room, True)
        except FrameError as exc:
            problem = exc  # joined here all the same; the client may retry the join
    await deps.hub.join(session, room)
    if deps.scope is not None:
        deps.scope.joined(session, room)
    session.push(frames.dumps({"type": "joined", "room": room}))
    if problem is not None:
        raise FrameError(problem.code, problem.message, "join")


async def handle_leave(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    room = frames.room_of(frame, "leave")
    if room == frames.LOBBY:
        # Everyone is always in the lobby (hello joins it): it cannot be left.
        raise FrameError("bad_room", f"{frames.LOBBY} is always joined and cannot be left", "leave")
    problem = None
    if room in session.rooms:
        try:
            await userstate.store_membership(deps, session.user, room, False)
        except FrameError as exc:
            problem = exc
    await deps.hub.leave(session, room)
    if deps.scope is not None:
        deps.scope.left(session, room)
    session.push(frames.dumps({"type": "left", "room": room}))
    if problem is not None:
        raise FrameError(problem.code, problem.message, "leave")


# --- durable send ------------------------------------------------------------------------
async def handle_send(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    cid = frames.client_id_of(frame)
    room = frames.room_of(frame, cid)
    content = frames.content_of(frame, deps.settings.max_content_bytes, cid)
    if room not in session.rooms:
        raise FrameError("not_joined", f"join {room!r} before sending to it", cid)
    msg = _new_message(session.user, content, cid, room=room)
    msg.reply_to = _reply_to_of(frame, cid)
    await send_event(msg, names.room_subject(room), session, deps)


async def handle_dm(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    cid = frames.client_id_of(frame)
    peer = frames.user_of(frame, "to", cid)
    if peer == session.user:
        raise FrameError("bad_user", "you cannot send a direct message to yourself", cid)
    content = frames.content_of(frame, deps.settings.max_content_bytes, cid)
    msg = _new_message(session.user, content, cid, dm_peer=peer)
    if deps.scope is not None:
        deps.scope.watch(session, peer)  # a DM peer's presence is worth seeing
    msg.reply_to = _reply_to_of(frame, cid)
    subject = names.dm_subject(session.user, peer)
    await send_event(msg, subject, session, deps)


def _reply_to_of(frame: dict[str, Any], cid: str) -> str:
    """The optional id of the message this one replies to (issue 14)."""
    reply_to = frame.get("reply_to")
    if reply_to is None:
        return ""
    if not isinstance(reply_to, str) or not ids.is_valid_id(reply_to):
        raise FrameError("bad_frame", "reply_to must be a message id", cid)
    return reply_to


def _new_message(
    sender: str, content: str, cid: str, room: str = "", dm_peer: str = ""
) -> pb.ChatMessage:
    return pb.ChatMessage(
        id=ids.new_id(),
        room=room,
        dm_peer=dm_peer,
        sender=sender,  # the token's user, never a field the client typed
        content=content,
        ts_ms=int(time.time() * 1000),
        client_id=cid,
    )


async def send_event(msg: ChatEvent, subject: str, session: Session, deps: Deps) -> None:
    """Publish a message (or an edit, delete, reaction) durably; the client's next frames
    are handled while it waits for its PubAck, which a callback answers (_on_pub_ack):
    no task per send. Waits while the socket has MAX_SENDS_IN_FLIGHT sends out.

    Ack only after JetStream stored it. The client_id is an idempotency key (see
    chatlib.idempotency): a retry of the same request (any gateway, within the duplicate
    window) is acked with the original's id, seq and time and `duplicate: true`; the same
    key with another target or content gets idempotency_conflict and no ack."""
    await session.send_started()
    try:
        payload, headers = codec.encode(msg)
        key = headers[names.HEADER_MSG_ID] = names.dedup_id(msg.sender, msg.client_id, msg.id)
        expected = ""
        if deps.settings.idempotency_check:
            expected = headers[names.HEADER_REQUEST_HASH] = message_events.fingerprint(msg)
        # Its live copy may come back before the PubAck: remember it first.
        deps.hub.published(key, payload, msg)
        try:
            pending = await deps.publisher.submit(
                subject, payload, headers, stream=names.STREAM_CHAT
            )
        except Exception as exc:
            raise _not_stored(msg, exc) from exc
    except BaseException:
        session.send_done()
        raise
    pending.add_done_callback(
        functools.partial(_on_pub_ack, _Send(msg, key, payload, expected, session, deps))
    )


@dataclass(slots=True)
class _Send:
    """A durable send waiting for its PubAck."""

    msg: ChatEvent
    key: str  # Nats-Msg-Id
    payload: bytes
    expected: str  # its request hash; "" when the idempotency check is off
    session: Session
    deps: Deps


def _on_pub_ack(send: _Send, pending: asyncio.Future[PubAck]) -> None:
    session = send.session
    try:
        ack = pending.result()
    except BaseException as exc:  # an error of JetStream or NATS, a timeout, stop()
        session.send_done()
        _refuse(session, _not_stored(send.msg, exc))
        return
    if ack.duplicate:
        # JetStream stored nothing and republished nothing: no live copy comes back.
        send.deps.hub.forget(send.key, send.payload)
        task = asyncio.create_task(_answer_duplicate(send, ack.seq))
        _DUPLICATES.add(task)
        task.add_done_callback(_DUPLICATES.discard)
        return
    msg = send.msg
    try:
        session.push(_ack_frame(msg.client_id, msg.id, ack.seq, msg.ts_ms))
    finally:
        session.send_done()  # whatever happens, the socket's count stays true


# Replies to duplicate sends being looked up (a reference keeps each task alive).
_DUPLICATES: set[asyncio.Task[None]] = set()


async def _answer_duplicate(send: _Send, seq: int) -> None:
    """A retry: ack it with the original's id and time if it is the same request, else
    idempotency_conflict (chatlib.idempotency). Keeps the send counted until answered."""
    msg, session = send.msg, send.session
    try:
        try:
            stored = await send.deps.js.get_msg(names.STREAM_CHAT, seq)
            data = stored.data or b""
            if (
                send.expected
                and message_events.stored_fingerprint(data, stored.headers) != send.expected
            ):
                raise idempotency.IdempotencyConflict(msg.client_id)
            original = message_events.decode_chat(data, stored.headers)
        except idempotency.IdempotencyConflict as exc:
            metrics.IDEMPOTENCY_CONFLICTS.inc()
            raise FrameError("idempotency_conflict", str(exc), msg.client_id) from exc
        except Exception as exc:
            raise _not_stored(msg, exc) from exc
        metrics.DUPLICATE_SENDS.inc()
        session.push(_ack_frame(msg.client_id, original.id, seq, original.ts_ms, duplicate=True))
    except FrameError as exc:
        _refuse(session, exc)
    finally:
        session.send_done()


def _not_stored(msg: ChatEvent, exc: BaseException) -> FrameError:
    metrics.SEND_FAILURES.inc()
    log.warning("send not durable: %s", exc, extra={"user": msg.sender})
    return FrameError(
        "send_failed",
        "the message could not be stored; retry with the same client_id",
        msg.client_id,
    )


def _ack_frame(client_id: str, msg_id: str, seq: int, ts: int, duplicate: bool = False) -> str:
    ack_frame: dict[str, Any] = {
        "type": "ack",
        "client_id": client_id,
        "id": msg_id,
        "seq": seq,
        "ts": ts,
    }
    if duplicate:  # optional fields are set as ack_frame[...] (tests/test_docs.py finds them)
        ack_frame["duplicate"] = True
    return frames.dumps(ack_frame)


# --- history -----------------------------------------------------------------------------
async def handle_history(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    limit = frame.get("limit", deps.settings.history_page_size)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= HISTORY_LIMIT_MAX:
        raise FrameError("bad_frame", f"limit must be 1-{HISTORY_LIMIT_MAX}", "history")
    before = frame.get("before") or ""
    if not isinstance(before, str) or (before and not ids.is_valid_id(before)):
        raise FrameError("bad_frame", "before must be a message id", "history")
    request = pb.HistoryRequest(requester=session.user, before_id=before, limit=limit)
    extra = lifecycle_frames.history_options(frame)  # around / thread (issue 14)
    request.around_id, request.thread_id = extra.get("around", ""), extra.get("thread", "")
    target: dict[str, str]
    if "room" in frame:
        request.room = frames.room_of(frame, "history")
        subject, target = names.HISTORY_ROOM, {"room": request.room}
    elif "with" in frame:
        request.dm_peer = frames.user_of(frame, "with", "history")
        subject, target = names.HISTORY_DM, {"with": request.dm_peer}
    else:
        raise FrameError("bad_frame", 'history needs "room" or "with"', "history")
    payload, headers = codec.encode(request)
    unavailable = FrameError("history_unavailable", "history is unavailable right now", "history")
    try:
        reply = await deps.nc.request(
            subject, payload, timeout=deps.settings.request_timeout, headers=headers
        )
    except Exception as exc:  # timeout, no responders, NATS down
        log.info("history request failed: %s", exc)
        raise unavailable from exc
    code = (reply.headers or {}).get(ERROR_CODE_HEADER)
    if code == "403":
        raise FrameError("forbidden", "you are not a participant of that thread", "history")
    if code == "400":
        raise FrameError("bad_frame", "the history service refused the request", "history")
    if code:
        raise unavailable
    try:
        page = codec.decode_as(pb.HistoryPage, reply.data, reply.headers)
    except codec.DecodeError as exc:
        raise unavailable from exc
    messages = [frames.message_object(m, None, m.sender == session.user) for m in page.messages]
    if page.states:  # edits, deletes, reactions, replies (issue 14)
        states = {state.id: state for state in page.states}
        for obj in messages:
            state = states.get(obj["id"])
            if state is not None:
                obj.update(lifecycle_frames.state_fields(state))
    session.push(
        frames.dumps(
            {"type": "history", **target, **extra, "messages": messages, "has_more": page.has_more}
        )
    )


# --- typing, ping ------------------------------------------------------------------------
async def handle_typing(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    if "room" in frame:
        room = frames.room_of(frame, "typing")
        if room not in session.rooms:
            raise FrameError("not_joined", f"join {room!r} first", "typing")
        event, subject = pb.Typing(room=room, user=session.user), names.typing_room_subject(room)
    elif "to" in frame:
        peer = frames.user_of(frame, "to", "typing")
        event = pb.Typing(dm_peer=peer, user=session.user)
        subject = names.typing_dm_subject(session.user, peer)
    else:
        raise FrameError("bad_frame", 'typing needs "room" or "to"', "typing")
    payload, headers = codec.encode(event)
    try:
        await deps.nc.publish(subject, payload, headers=headers)
    except Exception as exc:  # ephemeral: losing one indicator is fine
        log.debug("typing publish failed: %s", exc)


async def handle_ping(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    session.push(frames.dumps({"type": "pong"}))


async def handle_second_hello(frame: dict[str, Any], session: Session, deps: Deps) -> None:
    raise FrameError("bad_frame", "hello was already received", "hello")


HANDLERS: dict[str, Handler] = {
    "hello": handle_second_hello,
    "join": handle_join,
    "leave": handle_leave,
    "send": handle_send,
    "dm": handle_dm,
    "history": handle_history,
    "typing": handle_typing,
    "ping": handle_ping,
    "members": members.handle_members,
    "watch": members.handle_watch,
    "auth": reauth.handle_auth,
    "read": userstate.handle_read,
    "rooms": userstate.handle_rooms,
    "threads": userstate.handle_threads,
}


def _register_lifecycle() -> None:
    from gateway import lifecycle  # imports this module: registered once both exist

    HANDLERS.update(
        edit=lifecycle.handle_edit,
        delete=lifecycle.handle_delete,
        react=lifecycle.handle_react,
        search=lifecycle.handle_search,
    )


_register_lifecycle()
