"""ChatService's methods. Each takes the decoded request and the call's context; every
refusal is a `Refused` that the wiring (rpc.app) turns into a gRPC status.

The work itself is chatctl.client.ChatClient's (the NATS client library): the same durable
send with idempotency keys as the gateway, the same replay-then-live stream as resume_seq,
the same history and who services. This module adds who the caller is, the limits, and
the mapping of errors to status codes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from chatctl.client import ChatClient
from chatctl.errors import ChatError, IdempotencyConflict, ServiceError, ServiceUnavailable
from chatlib import presence_client, validate
from chatlib.auth import Authenticator, AuthError
from chatlib.guest_names import GuestNames, NameTaken
from chatlib.limits import TokenBucket
from chatlib.proto.chat import v1 as pb

from rpc import metrics
from rpc.settings import RpcSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_CLIENT_ID = 64  # as the gateway's client_id
HISTORY_LIMIT_MAX = 200
# Trailing metadata of a stream that ended early: the last seq it delivered, to pass as
# since_seq when resuming.
LAST_SEQ_KEY = "chat-last-seq"


class Context(Protocol):
    """What the handlers use of grpc.aio.ServicerContext."""

    def invocation_metadata(self) -> Any: ...

    def time_remaining(self) -> float | None: ...

    def set_trailing_metadata(self, metadata: Any) -> None: ...


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


@dataclass
class Limiter:
    """One write and one read token bucket per user, as many users as `max_users` (least
    recently seen forgotten first: a forgotten user starts with a full bucket)."""

    settings: RpcSettings
    buckets: OrderedDict[tuple[str, str], TokenBucket] = field(default_factory=OrderedDict)

    def take(self, user: str, kind: str) -> None:
        bucket = self.buckets.pop((user, kind), None)
        if bucket is None:
            s = self.settings
            rate, burst = (
                (s.rate_per_second, s.rate_burst)
                if kind == "write"
                else (s.read_rate_per_second, s.read_rate_burst)
            )
            bucket = TokenBucket(rate, burst)
        self.buckets[(user, kind)] = bucket
        while len(self.buckets) > self.settings.rate_buckets_max * 2:
            self.buckets.popitem(last=False)
        if not bucket.take():
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"slow down: too many {kind}s")


@dataclass
class Deps:
    client: ChatClient
    auth: Authenticator
    limiter: Limiter
    settings: RpcSettings
    # Guest mode: the name reservations guest tokens are bound to.
    guest_names: GuestNames | None = None
    # Set when the service stops: open streams end with UNAVAILABLE and their last seq.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Set (and replaced) when the NATS connection drops: a live subscription misses what
    # is stored until it is back, so the streams open now end and their clients resume.
    connection_lost: asyncio.Event = field(default_factory=asyncio.Event)

    def lost_connection(self) -> None:
        self.connection_lost.set()
        self.connection_lost = asyncio.Event()


async def caller(context: Context, deps: Deps) -> str:
    """The user of the call's `authorization: Bearer <token>` metadata. A guest token is
    good only while its name reservation is its own (chatlib.guest_names)."""
    metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
    scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "send authorization: Bearer <token>")
    try:
        if deps.auth.settings.auth_mode == "oidc":  # may fetch the provider's keys
            identity = await asyncio.to_thread(deps.auth.identify, token.strip())
        else:
            identity = deps.auth.identify(token.strip())
    except AuthError as exc:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from exc
    if deps.guest_names is not None and identity.holder:
        try:
            await deps.guest_names.reserve(identity.user, identity.holder)
        except NameTaken as exc:
            message = f"name_taken: {identity.user!r} is held by someone else"
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, message) from exc
        except Exception as exc:  # fail closed
            log.warning("cannot check guest name %s: %s", identity.user, exc)
            raise Refused(grpc.StatusCode.UNAVAILABLE, "guest names are unavailable") from exc
    return identity.user


async def within_deadline(context: Context, deps: Deps, work: Awaitable[T]) -> T:
    """Run `work` within the caller's deadline (and never longer than request_timeout);
    map the client library's errors to status codes."""
    remaining = context.time_remaining()
    limit = deps.settings.request_timeout
    if remaining is not None and remaining < limit:
        limit = remaining
    try:
        return await asyncio.wait_for(work, max(limit, 0.001))
    except TimeoutError as exc:
        if remaining is not None and remaining <= deps.settings.request_timeout:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from exc
        raise Refused(grpc.StatusCode.UNAVAILABLE, "NATS did not answer in time") from exc
    except IdempotencyConflict as exc:
        raise Refused(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
    except ServiceError as exc:
        code = {403: grpc.StatusCode.PERMISSION_DENIED, 400: grpc.StatusCode.INVALID_ARGUMENT}
        raise Refused(code.get(exc.code, grpc.StatusCode.UNAVAILABLE), str(exc)) from exc
    except (ServiceUnavailable, ChatError, OSError) as exc:
        raise Refused(grpc.StatusCode.UNAVAILABLE, f"retry (same client_id): {exc}") from exc


def name(kind: str, value: str) -> str:
    if not validate.is_valid_name(value):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{kind} must be {validate.NAME_RULE}")
    return value


# --- the four methods -------------------------------------------------------------------


async def send_message(request: pb.ChatMessage, context: Context, deps: Deps) -> pb.SendResponse:
    user = await caller(context, deps)
    deps.limiter.take(user, "write")
    if bool(request.room) == bool(request.dm_peer):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "set exactly one of room or dm_peer")
    target: dict[str, str] = (
        {"room": name("room", request.room)}
        if request.room
        else {"to": name("dm_peer", request.dm_peer)}
    )
    if request.dm_peer == user:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "no direct messages to yourself")
    if not request.content.strip():
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "content is empty")
    if len(request.content.encode()) > deps.settings.max_content_bytes:
        limit = deps.settings.max_content_bytes
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"content is over {limit} bytes")
    if len(request.client_id) > MAX_CLIENT_ID:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"client_id over {MAX_CLIENT_ID} chars")
    # The sender is the token's user: request.sender, id and ts_ms are not read.
    sent = await within_deadline(
        context,
        deps,
        deps.client.send(
            content=request.content, sender=user, client_id=request.client_id or None, **target
        ),
    )
    return pb.SendResponse(id=sent.id, seq=sent.seq, ts_ms=sent.ts_ms, duplicate=sent.duplicate)


async def get_history(request: pb.HistoryRequest, context: Context, deps: Deps) -> pb.HistoryPage:
    user = await caller(context, deps)
    deps.limiter.take(user, "read")
    if bool(request.room) == bool(request.dm_peer):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "set exactly one of room or dm_peer")
    if not 0 <= request.limit <= HISTORY_LIMIT_MAX:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"limit must be 0-{HISTORY_LIMIT_MAX}")
    # The requester is the caller: the archive serves a DM thread to its participants only.
    # Naming another requester asks for someone else's thread.
    if request.requester and request.requester != user:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED, "requester must be the caller")
    query = deps.client.history(
        room=name("room", request.room) if request.room else None,
        dm=(user, name("dm_peer", request.dm_peer)) if request.dm_peer else None,
        requester=user,
        before_id=request.before_id,
        limit=request.limit or 50,
    )
    return await within_deadline(context, deps, query)


async def list_online(request: pb.WhoRequest, context: Context, deps: Deps) -> pb.WhoPage:
    deps.limiter.take(await caller(context, deps), "read")
    page = presence_client.who(
        deps.client.nc, request.after, request.limit, deps.settings.request_timeout
    )
    try:
        return await within_deadline(context, deps, page)
    except presence_client.PresenceUnavailable as exc:
        raise Refused(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc


async def stream_messages(
    request: pb.StreamRequest, context: Context, deps: Deps
) -> AsyncIterator[pb.StreamItem]:
    """Replay then live, through a bounded buffer: a caller that falls `stream_buffer`
    messages behind is ended with RESOURCE_EXHAUSTED, and a stopping service ends every
    stream with UNAVAILABLE; either way trailing metadata `chat-last-seq` says where to
    resume (since_seq)."""
    user = await caller(context, deps)
    deps.limiter.take(user, "read")
    rooms = [name("room", r) for r in dict.fromkeys(request.rooms)]
    if not rooms and not request.direct_messages:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "give rooms or direct_messages")
    since = request.since_seq  # None (unset): live only
    buffer: asyncio.Queue[pb.StreamItem] = asyncio.Queue(deps.settings.stream_buffer)
    overflow = asyncio.Event()

    async def pump() -> None:
        source = deps.client.stream(rooms, since, user if request.direct_messages else None)
        async for item in source:
            try:
                buffer.put_nowait(pb.StreamItem(seq=item.seq, message=item.message))
            except asyncio.QueueFull:
                overflow.set()
                return

    last = request.since_seq or 0
    metrics.STREAMS.inc()
    producer = asyncio.create_task(pump(), name=f"rpc-stream-{user}")
    stop = asyncio.ensure_future(_either(deps.stopping, deps.connection_lost))
    try:
        while True:
            if stop.done():  # ends now, not when traffic pauses; nothing is lost
                raise _why_ended(context, last, overflow, producer, stop)
            if buffer.empty():
                getter = asyncio.ensure_future(buffer.get())
                await asyncio.wait({getter, producer, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()  # still waiting: cancelling it loses nothing
                    if buffer.empty():
                        raise _why_ended(context, last, overflow, producer, stop)
                    continue
                item = getter.result()
            else:
                item = buffer.get_nowait()
            yield item
            last = item.seq
            metrics.STREAMED.inc()
    finally:
        metrics.STREAMS.dec()
        stop.cancel()
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)


def _why_ended(
    context: Context,
    last: int,
    overflow: asyncio.Event,
    producer: asyncio.Task[None],
    stop: asyncio.Future[Any],
) -> Refused:
    """The status of a stream that ends with nothing left to deliver, with the last seq
    delivered in trailing metadata."""
    context.set_trailing_metadata(((LAST_SEQ_KEY, str(last)),))
    if stop.done():
        return Refused(
            grpc.StatusCode.UNAVAILABLE, "server stopping or NATS lost: resume from chat-last-seq"
        )
    if overflow.is_set():
        return Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "too far behind: resume from chat-last-seq"
        )
    failed = None if producer.cancelled() else producer.exception()
    return Refused(grpc.StatusCode.UNAVAILABLE, f"the chat log is unavailable: {failed}")


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    waits = {asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
