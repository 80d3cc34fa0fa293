"""A small client for services and bots: send, stream (replay then live), history, who.

The NATS counterpart of a unary `Send` plus a server-streamed `Subscribe` that first
replays recent history:

    client = await ChatClient.connect("nats://127.0.0.1:4222")
    msg_id, seq = await client.send(room="lobby", content="hi", sender="bot", client_id="k1")
    async for item in client.stream(["lobby"], since=seq):
        print(item.seq, item.message.content)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import betterproto2
import nats
import nats.errors
from chatlib import (
    backoff,
    codec,
    idempotency,
    ids,
    message_events,
    names,
    presence_client,
    validate,
)
from chatlib.proto.chat import v1 as pb
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NoStreamResponseError, NotFoundError
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from chatctl.errors import (
    ChatError,
    IdempotencyConflict,
    NatsUnreachable,
    ServiceError,
    ServiceUnavailable,
    UsageError,
)


@dataclass(frozen=True)
class StreamedMessage:
    """A chat message with its CHAT stream sequence (the resume point) and subject."""

    seq: int
    subject: str
    message: pb.ChatMessage


class _SentFields(NamedTuple):
    id: str
    seq: int


class Sent(_SentFields):
    """What send() returns: unpacks as (id, seq); `duplicate` is True when the send was
    a retry of a request already stored (id, seq and ts_ms are then the original's)."""

    duplicate: bool
    ts_ms: int

    def __new__(cls, id: str, seq: int, duplicate: bool = False, ts_ms: int = 0) -> Sent:
        sent = super().__new__(cls, id, seq)
        sent.duplicate = duplicate
        sent.ts_ms = ts_ms
        return sent


def check_name(kind: str, name: str) -> str:
    if not validate.is_valid_name(name):
        raise UsageError(f"bad {kind} name {name!r}: {validate.NAME_RULE}")
    return name


class ChatClient:
    """One NATS connection and the chat operations on top of it."""

    def __init__(
        self, nc: NATS, request_timeout: float = 5.0, closed: asyncio.Event | None = None
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.request_timeout = request_timeout
        # Set when the connection is closed for good (reconnects exhausted, or close()).
        self.closed = closed or asyncio.Event()

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        user: str = "",
        password: str = "",
        creds: str = "",
        name: str = "chat-client",
        connect_timeout: float = 2.0,
        fail_fast: bool = True,
        request_timeout: float = 5.0,
    ) -> ChatClient:
        """Connect; with fail_fast (the CLI), an unreachable NATS raises NatsUnreachable
        within a few seconds instead of retrying forever. Long-running bots pass
        fail_fast=False to wait for NATS and reconnect without end."""
        server_list = [servers] if isinstance(servers, str) else list(servers)

        async def quiet(exc: Exception) -> None:
            # nats-py logs every failed attempt; the caller gets one clear error instead.
            pass

        closed = asyncio.Event()

        async def on_closed() -> None:
            closed.set()

        options: dict[str, Any] = {
            "servers": server_list,
            "closed_cb": on_closed,
            "name": name,
            "connect_timeout": connect_timeout,
            "error_cb": quiet,
            "reconnect_time_wait": 0.2 if fail_fast else 0.5,
            # nats-py treats 0 as "no limit" on the first connect; 1 means one retry.
            "max_reconnect_attempts": 1 if fail_fast else -1,
        }
        if not fail_fast:
            # Full-jitter exponential backoff (chatlib.backoff): bots that lost the same
            # NATS server do not all come back in the same instant.
            options["reconnect_to_server_handler"] = _jittered_reconnect
        if creds:
            options["user_credentials"] = creds
        elif user:
            options["user"] = user
            options["password"] = password
        where = ", ".join(server_list)
        try:
            if fail_fast:
                budget = (connect_timeout + 0.5) * 2 * len(server_list) + 1
                nc = await asyncio.wait_for(nats.connect(**options), budget)
            else:
                nc = await nats.connect(**options)
        except nats.errors.AuthorizationError as exc:
            raise NatsUnreachable(f"NATS at {where} refused the credentials: {exc}") from exc
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            reason = str(exc) or type(exc).__name__
            raise NatsUnreachable(f"cannot reach NATS at {where}: {reason}") from exc
        return cls(nc, request_timeout, closed)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.drain()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- send ------------------------------------------------------------------------

    async def send(
        self,
        *,
        content: str,
        sender: str,
        room: str | None = None,
        to: str | None = None,
        client_id: str | None = None,
    ) -> Sent:
        """Publish a message as the gateway does; returns a Sent, which unpacks as
        (message id, CHAT sequence).

        `client_id` is an idempotency key, as for the gateway: reusing it within the
        stream's duplicate window for the same request (same target, same content) stores
        nothing and returns the original message's id and seq with `duplicate` True;
        reusing it for a different request raises IdempotencyConflict and stores
        nothing."""
        if (room is None) == (to is None):
            raise UsageError("give exactly one of room or to")
        check_name("user", sender)
        if not content:
            raise UsageError("content is empty")
        message = pb.ChatMessage(
            id=ids.new_id(),
            sender=sender,
            content=content,
            ts_ms=int(time.time() * 1000),
            client_id=client_id or "",
        )
        if room is not None:
            message.room = check_name("room", room)
            subject = names.room_subject(room)
        else:
            assert to is not None
            message.dm_peer = check_name("user", to)
            subject = names.dm_subject(sender, to)
        payload, headers = codec.encode(message)
        headers[names.HEADER_MSG_ID] = names.dedup_id(sender, message.client_id, message.id)
        expected = headers[names.HEADER_REQUEST_HASH] = idempotency.fingerprint(message)
        try:
            ack = await self.js.publish(
                subject, payload, timeout=self.request_timeout, headers=headers
            )
            if not ack.duplicate:
                return Sent(message.id, ack.seq, ts_ms=message.ts_ms)
            stored = await self.js.get_msg(names.STREAM_CHAT, ack.seq)
        except NoStreamResponseError as exc:
            raise ServiceUnavailable(
                f"no stream stores {subject}: is stream {names.STREAM_CHAT} provisioned?"
            ) from exc
        except nats.errors.TimeoutError as exc:
            raise ServiceUnavailable(f"no PubAck for {subject} (JetStream slow?)") from exc
        except NotFoundError as exc:
            raise ChatError(f"the original of client_id {client_id!r} is gone") from exc
        data = stored.data or b""
        try:
            idempotency.check_replay(expected, message.client_id, data, stored.headers)
        except idempotency.IdempotencyConflict as exc:
            raise IdempotencyConflict(str(exc)) from exc
        original = self._decode_reply(pb.ChatMessage, data, dict(stored.headers or {}))
        return Sent(original.id, ack.seq, duplicate=True, ts_ms=original.ts_ms)

    # --- request/reply ---------------------------------------------------------------

    async def _request(
        self, service: str, subject: str, request: betterproto2.Message
    ) -> tuple[bytes, dict[str, str]]:
        payload, headers = codec.encode(request)
        try:
            reply = await self.nc.request(
                subject, payload, timeout=self.request_timeout, headers=headers
            )
        except nats.errors.NoRespondersError as exc:
            raise ServiceUnavailable(
                f"{service} is not running (no responders on {subject})"
            ) from exc
        except nats.errors.TimeoutError as exc:
            raise ServiceUnavailable(f"{service} did not answer on {subject} in time") from exc
        reply_headers = dict(reply.headers or {})
        code = reply_headers.get(ERROR_CODE_HEADER)
        if code is not None or ERROR_HEADER in reply_headers:
            description = reply_headers.get(ERROR_HEADER, "unknown error")
            raise ServiceError(service, int(code) if code and code.isdigit() else 500, description)
        return reply.data, reply_headers

    async def history(
        self,
        *,
        room: str | None = None,
        dm: tuple[str, str] | None = None,
        requester: str = "chatctl",
        before_id: str = "",
        limit: int = 50,
    ) -> pb.HistoryPage:
        """A page of a room's or DM thread's history, oldest first. For a DM the requester
        is the first of the pair, as the service serves a thread only to a participant."""
        if (room is None) == (dm is None):
            raise UsageError("give exactly one of room or dm")
        if room is not None:
            request = pb.HistoryRequest(
                room=check_name("room", room),
                requester=check_name("user", requester),
                before_id=before_id,
                limit=limit,
            )
            subject = names.HISTORY_ROOM
        else:
            assert dm is not None
            request = pb.HistoryRequest(
                dm_peer=check_name("user", dm[1]),
                requester=check_name("user", dm[0]),
                before_id=before_id,
                limit=limit,
            )
            subject = names.HISTORY_DM
        data, headers = await self._request(names.SERVICE_HISTORY, subject, request)
        return self._decode_reply(pb.HistoryPage, data, headers)

    async def search(
        self,
        query: str,
        *,
        requester: str,
        rooms: Sequence[str] = (),
        before_id: str = "",
        limit: int = 20,
    ) -> pb.SearchPage:
        """Full-text search as `requester` sees it: the given rooms and the requester's
        own DM threads, newest first (issue 14)."""
        if not query.strip() or len(query) > 200:
            raise UsageError("query must be 1-200 characters")
        request = pb.SearchRequest(
            requester=check_name("user", requester),
            rooms=[check_name("room", r) for r in rooms],
            query=query,
            before_id=before_id,
            limit=limit,
        )
        data, headers = await self._request(names.SERVICE_HISTORY, names.HISTORY_SEARCH, request)
        return self._decode_reply(pb.SearchPage, data, headers)

    async def rooms(self, prefix: str = "", after: str = "", limit: int = 50) -> pb.RoomsPage:
        """A page of the room directory (chat-userstate), by name."""
        request = pb.RoomsRequest(prefix=prefix, after=after, limit=limit)
        data, headers = await self._request(names.SERVICE_USERSTATE, names.USERSTATE_ROOMS, request)
        return self._decode_reply(pb.RoomsPage, data, headers)

    async def user_state(self, user: str) -> pb.UserState:
        """A user's rooms and unread/mention counts as the archive holds them (exact up to
        its `archived_through`; the gateway adds the CHAT tail after it at hello)."""
        request = pb.UserStateRequest(user=check_name("user", user), cap=100)
        data, headers = await self._request(names.SERVICE_USERSTATE, names.USERSTATE_STATE, request)
        return self._decode_reply(pb.UserState, data, headers)

    async def who(self) -> list[str]:
        """Every user online, across all pages, sorted by name."""
        # One paging implementation for the gateway and chatctl.
        try:
            return await presence_client.who_all(self.nc, self.request_timeout)
        except presence_client.PresenceUnavailable as exc:
            raise ServiceUnavailable(f"{names.SERVICE_PRESENCE} unavailable: {exc}") from exc

    async def members(self, room: str) -> list[tuple[str, bool]]:
        """The members of a room (who joined it and has not left) with their online
        state, sorted by name. The lobby's members are the users online."""
        check_name("room", room)
        online = set(await self.who())
        if room == LOBBY:
            return [(user, True) for user in sorted(online)]
        try:
            kv = await self.js.key_value(names.KV_MEMBERS)
            watcher = await kv.watch(f"{room}.*", ignore_deletes=True, meta_only=True)
        except Exception as exc:
            raise ServiceUnavailable(f"room membership unavailable: {exc}") from exc
        users: list[str] = []
        try:
            async for entry in watcher:
                if entry is None:
                    break
                users.append(entry.key.partition(".")[2])
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return [(user, user in online) for user in sorted(users)]

    @staticmethod
    def _decode_reply(cls: type[codec.M], data: bytes, headers: dict[str, str]) -> codec.M:
        try:
            return codec.decode_as(cls, data, headers)
        except codec.DecodeError as exc:
            raise ChatError(f"undecodable reply: {exc}") from exc

    # --- stream: replay then live ----------------------------------------------------

    async def stream(
        self,
        rooms: Sequence[str] = (),
        since: int | None = None,
        dm_user: str | None = None,
    ) -> AsyncIterator[StreamedMessage]:
        """Messages of `rooms` (and the DMs of `dm_user`) with sequence > `since`, then live.

        One JetStream ordered consumer on the CHAT stream, filtered to those subjects,
        from `since` + 1: the replay and the live messages come through the same
        subscription, in stream order across all the rooms, so the last seq received is
        always a safe resume point (several core subscriptions, one per room, would each
        keep their own order but not the order between them). The consumer re-creates
        itself from the last seq after a missed heartbeat or a gap. since=None: live only.
        Messages older than the stream keeps (its max age/size) cannot be replayed; fetch
        them with history()."""
        for room in rooms:
            check_name("room", room)
        if dm_user is not None:
            check_name("user", dm_user)
        if not rooms and dm_user is None:
            raise UsageError("stream needs at least one room or a dm_user")
        # Consumer filters must not overlap, so a user's DMs come from all DMs and are
        # filtered here.
        filters = [names.room_subject(r) for r in dict.fromkeys(rooms)]
        if dm_user is not None:
            filters.append(names.DM_ALL)

        def wanted(subject: str) -> bool:
            parsed = names.parse_chat_subject(subject)
            if parsed is None:
                return False
            kind, key = parsed
            if kind == "room":
                return key in rooms
            return dm_user is not None and dm_user in key.split(".")

        config = api.ConsumerConfig(
            filter_subjects=filters,
            deliver_policy=(
                api.DeliverPolicy.NEW if since is None else api.DeliverPolicy.BY_START_SEQUENCE
            ),
            opt_start_seq=None if since is None else since + 1,
        )
        try:
            sub = await self.js.subscribe(
                "", stream=names.STREAM_CHAT, config=config, ordered_consumer=True
            )
        except NotFoundError as exc:
            raise ServiceUnavailable(f"stream {names.STREAM_CHAT} does not exist") from exc
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise ServiceUnavailable(f"JetStream did not answer: {exc}") from exc
        try:
            async for msg in sub.messages:
                message = _decode_chat(msg)
                if message is not None and wanted(msg.subject):
                    yield StreamedMessage(msg.metadata.sequence.stream, msg.subject, message)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


LOBBY = "lobby"  # every socket is in it (the gateway's frames.LOBBY)


def _jittered_reconnect(servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
    """nats-py's reconnect hook: the server tried least so far, after a full-jitter delay
    that grows with the attempts (a server that was reached resets its count)."""
    server = min(servers, key=lambda s: s.reconnects)
    return server, backoff.delay(server.reconnects)


def _decode_chat(msg: Msg) -> pb.ChatMessage | None:
    try:
        event = message_events.decode_chat(msg.data, msg.headers)
    except codec.DecodeError:
        return None  # not ours to fix: the archive parks such payloads in DEADLETTER
    # Edits, deletes and reactions (issue 14) share the chat subjects; this stream (and
    # the gRPC StreamMessages built on it) carries messages only, so they are skipped
    # here on purpose: history and the WebSocket show their effect.
    return event if isinstance(event, pb.ChatMessage) else None
