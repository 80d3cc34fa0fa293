"""JetStream publishes that wait for their PubAck together (issue 18).

`js.publish` is a NATS request: per message a new inbox token, a future, and an
`asyncio.wait_for` that wraps the wait in a task with its own timer. At thousands of
durable sends a second that machinery, not JetStream, was the gateway's cost. Here (as
the Go and Java clients' PublishAsync do) one wildcard subscription `<inbox>.*` takes
every PubAck, each publish is one `nc.publish` whose reply subject names its token, the
PubAck resolves that token's future, and one periodic sweep fails the ones whose time is
up. At most `max_in_flight` publishes wait at a time; past that, publishers wait for a
slot (within their timeout).

nats-py 2.16 has `JetStreamContext.publish_async` on the same design, but it times
nothing out (a lost PubAck waits forever) and a publish that raises (connection closed,
outbound buffer full while reconnecting) keeps its in-flight slot for good, so after
enough such failures every publish stalls. Hence this module.

The outcomes are `js.publish`'s: a `PubAck`, `APIError` (the stream refused it),
`NoStreamResponseError` (no stream listens on the subject), `nats.errors.TimeoutError`.

`request` is a core request on the same machinery (the hello's user-state request):
the reply, or the `NoRespondersError` / `TimeoutError` that `nc.request` raises.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.errors import APIError, NoStreamResponseError

from chatlib.nats_client import publish_now, subscribe_handler

# The status header of a reply from the server itself, and the status meaning nobody
# was subscribed to the subject (no stream stores it).
_STATUS = "Status"
_NO_RESPONDERS = "503"
# PubAck fields a PubAck can be built from directly; anything else (batch, count, val,
# fields of a newer server) goes through nats-py's own reader.
_PLAIN_FIELDS = frozenset(("stream", "seq", "duplicate", "domain"))
# The PubAck nats-server writes for a plain stream, byte for byte (fields in its order,
# `duplicate` only when true, and then as `"duplicate": true`): read without JSON.
_COMMON_ACK = re.compile(
    rb'\{"stream":"([A-Za-z0-9_-]+)","seq":([1-9][0-9]{0,19})(,"duplicate": ?true)?\}'
)
# How often the sweep looks for publishes past their deadline, as a share of the timeout
# (a timeout fires at most this much late).
_SWEEP_SHARE = 0.1


def parse_pub_ack(data: bytes) -> api.PubAck:
    """A JetStream publish reply as nats-py reads it (`PubAck.from_response`), or the
    `APIError` it carries. Most replies are `{"stream":..,"seq":..}` (+ `duplicate`),
    built without nats-py's generic field walk (or a JSON parser)."""
    common = _COMMON_ACK.fullmatch(data)
    if common is not None:
        stream, seq, duplicate = common.groups()
        return api.PubAck(
            stream=stream.decode(), seq=int(seq), duplicate=True if duplicate else None
        )
    resp = json.loads(data)
    error = resp.get("error")
    if error is not None:
        raise APIError.from_error(error)
    if resp.keys() <= _PLAIN_FIELDS:
        return api.PubAck(**resp)
    return api.PubAck.from_response(resp)


def _read_pub_ack(reply: Msg) -> api.PubAck:
    """A publish's reply as js.publish reads it."""
    if reply.headers and reply.headers.get(_STATUS) == _NO_RESPONDERS:
        raise NoStreamResponseError()
    return parse_pub_ack(reply.data)  # or the APIError the reply carries


def _read_reply(reply: Msg) -> Msg:
    """A core request's reply as nc.request reads it."""
    if reply.headers and reply.headers.get(_STATUS) == _NO_RESPONDERS:
        raise nats.errors.NoRespondersError()
    return reply


# What a waiting token's reply settles: its future, and how the reply is read for it.
_Waiting = tuple["asyncio.Future[Any]", Callable[[Msg], Any]]


class JetStreamPublisher:
    """Publishes to JetStream on one NATS connection; `start` before use, `stop` after."""

    def __init__(self, nc: NATS, timeout: float, max_in_flight: int = 4096) -> None:
        self._nc = nc
        self._timeout = timeout
        # Free in-flight slots; publishers waiting for one (only while the window is full).
        self._free = max_in_flight
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._prefix = ""
        self._sub: Subscription | None = None
        self._next_token = 0
        self._waiting: dict[str, _Waiting] = {}
        # (deadline, token, future) in publish order: with one timeout for all, deadlines
        # only grow, so the sweep looks at the front only.
        self._deadlines: deque[tuple[float, str, asyncio.Future[Any]]] = deque()
        self._sweep_timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox() + "."
        self._sub = await subscribe_handler(self._nc, self._prefix + "*", self._on_reply)

    async def stop(self) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass  # the connection is gone already: so is the subscription
        waiting, self._waiting = self._waiting, {}
        self._deadlines.clear()
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(nats.errors.ConnectionClosedError())
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())

    async def publish(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None = None,
        stream: str | None = None,
    ) -> api.PubAck:
        """Publish and wait for the PubAck; `stream` makes JetStream refuse to store it in
        any other stream (Nats-Expected-Stream, added to `headers` as js.publish does).
        Waits at most the timeout for a slot, then at most the timeout for the PubAck."""
        return await (await self.submit(subject, payload, headers, stream))

    async def submit(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None = None,
        stream: str | None = None,
    ) -> asyncio.Future[api.PubAck]:
        """`publish` up to the PubAck: returns once the message is handed to the NATS
        connection, with the future the PubAck (or its error) settles. A caller that has
        many publishes out adds a callback to it rather than running a task per publish
        (a task per durable send was a tenth of the gateway's CPU, issue 18). Errors of
        the hand-over (no slot within the timeout, connection closed) are raised here."""
        if stream is not None:
            if headers is None:
                headers = {}
            headers[api.Header.EXPECTED_STREAM] = stream
        return await self._submit(subject, payload, headers, _read_pub_ack)

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> Msg:
        """A core NATS request on the same reply subscription (what `nc.request` does,
        without a new inbox token, future timer and task per request): the reply, or
        nats.errors.NoRespondersError / nats.errors.TimeoutError as nc.request raises."""
        reply: Msg = await (await self._submit(subject, payload, headers, _read_reply))
        return reply

    async def _submit(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        read: Callable[[Msg], Any],
    ) -> asyncio.Future[Any]:
        if self._sub is None:
            raise nats.errors.ConnectionClosedError()
        loop = asyncio.get_running_loop()
        if self._free > 0 and not self._slot_waiters:
            self._free -= 1
        else:  # the window is full: wait for a slot, not forever
            await self._wait_for_slot(loop)
        try:
            self._next_token += 1
            token = str(self._next_token)
            future: asyncio.Future[Any] = loop.create_future()
            self._waiting[token] = (future, read)
            reply = self._prefix + token
            try:
                if not publish_now(self._nc, subject, payload, reply, headers):
                    await self._nc.publish(subject, payload, reply=reply, headers=headers)
            except BaseException:
                del self._waiting[token]
                raise
        except BaseException:
            self._release_slot()
            raise
        # The slot is held while the token waits in _waiting: whoever takes it out of
        # there (reply, sweep) releases the slot. Taken now, so deadlines are in the
        # deque's order (the sweep relies on it).
        self._deadlines.append((loop.time() + self._timeout, token, future))
        if self._sweep_timer is None:
            self._sweep_timer = loop.call_later(self._timeout * _SWEEP_SHARE, self._sweep)
        return future

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self._timeout)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release_slot()  # handed a slot just as we gave up: pass it on
            if isinstance(exc, TimeoutError):
                raise nats.errors.TimeoutError() from exc
            raise

    def _release_slot(self) -> None:
        """Hand a slot to the first publisher still waiting for one, else free it."""
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if waiting is None:
            return  # timed out before the reply came
        self._release_slot()
        future, read = waiting
        if future.done():
            return  # its publisher gave up (cancelled) before the reply came
        try:
            future.set_result(read(msg))
        except Exception as exc:  # an APIError, no responders, a reply that is not a PubAck
            future.set_exception(exc)

    def _sweep(self) -> None:
        """Fail the publishes past their deadline, drop the settled ones from the front."""
        now = asyncio.get_running_loop().time()
        deadlines, waiting = self._deadlines, self._waiting
        while deadlines:
            deadline, token, future = deadlines[0]
            if not future.done():
                if deadline > now:
                    break
                future.set_exception(nats.errors.TimeoutError())
            deadlines.popleft()
            if waiting.pop(token, None) is not None:
                self._release_slot()
        self._sweep_timer = None
        if deadlines:
            self._sweep_timer = asyncio.get_running_loop().call_later(
                self._timeout * _SWEEP_SHARE, self._sweep
            )
