"""Batches from a durable pull consumer, asked for as nats-py's PullSubscription.fetch asks,
without its cost per message: fetch waits for each message of a batch with a task, a
timer and a uuid of its own (Subscription.next_msg), a seventh of an archive replica's
time while draining. Here the replies land in a callback subscription and a batch costs
one wait, however many messages it holds.

The requests are fetch's (JetStream's pull protocol, `CONSUMER.MSG.NEXT`): first a
no-wait request for what is there now; when that brings nothing, a request that waits
up to the timeout for the first messages. Each request has its own reply subject, so the
status that ends a request (404 no messages, 408 expired, 409) is never taken for the end
of a later one. A message that arrives after its fetch gave up (a late reply) is kept for
the next fetch: it was delivered to this replica, and the ack timer runs.
`tests/test_archive_service.py` runs this against a real NATS next to nats-py's fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

STATUS = "Status"  # the header of JetStream's status messages (no payload)
DESCRIPTION = "Description"
HEARTBEAT = "100"
# The statuses that only end a request (nothing there, request expired, or a 409 such as
# too many waiting requests or a leader change): ask again later. Anything else is an error.
REQUEST_ENDED = {"404", "408", "409"}
# How long a waiting fetch gathers more messages after the first one arrived.
SETTLE = 0.02


class PullError(Exception):
    """JetStream answered a pull request with an error status (e.g. 503: no JetStream)."""


class BatchPuller:
    def __init__(self, nc: NATS, stream: str, consumer: str) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self.numbers = itertools.count()
        self.sub: Subscription | None = None
        self.held: list[Msg] = []  # delivered to us, not handed out yet
        self.request = ""  # reply subject of the request being waited for
        self.wanted = 0
        self.ended = asyncio.Event()
        self.error: str | None = None
        self.settle: float | None = None  # see fetch
        self.settle_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_reply)

    async def stop(self) -> None:
        """Stop listening: a late reply to the last request is redelivered after ack_wait."""
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to about `batch` messages (late replies to earlier requests come too): what
        the consumer has now, else the first that come within `timeout`; [] if none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if len(self.held) < batch:
            await self._ask(batch - len(self.held), deadline, no_wait=True)
        if not self.held:
            remaining = deadline - loop.time()
            # As nats-py: the request expires just before we stop waiting for it.
            expires = int(remaining * 1e9) - 100_000
            if expires > 0:
                # Unlike nats-py, stop waiting SETTLE after the first message instead of
                # at the deadline: a quiet system's messages reach history within
                # milliseconds, not a fetch timeout later. The rest of the request's
                # messages are late replies, kept for the next fetch.
                await self._ask(batch, deadline, settle=SETTLE, expires=expires)
        msgs, self.held = self.held, []
        return msgs

    async def _ask(
        self, batch: int, deadline: float, settle: float | None = None, **options: object
    ) -> None:
        """Send one pull request; wait until it is answered in full, ends, the deadline,
        or (with `settle`) that long after its first message."""
        self.request = f"{self.inbox}.{next(self.numbers)}"
        self.wanted = len(self.held) + batch
        self.settle = settle
        if self.settle_timer is not None:
            self.settle_timer.cancel()  # it belonged to an earlier request
            self.settle_timer = None
        self.ended.clear()
        self.error = None
        payload = orjson.dumps({"batch": batch, **options})
        await self.nc.publish(self.subject, payload, reply=self.request)
        remaining = deadline - asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ended.wait(), max(remaining, 0))
        if self.error is not None and not self.held:
            raise PullError(self.error)

    async def _on_reply(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(STATUS) if headers and not msg.data else None
        if status is None:
            self.held.append(msg)
            if len(self.held) >= self.wanted:
                self.ended.set()
            elif self.settle is not None and len(self.held) == 1:
                loop = asyncio.get_running_loop()
                self.settle_timer = loop.call_later(self.settle, self.ended.set)
        elif status == HEARTBEAT or msg.subject != self.request:
            return  # a heartbeat, or the end of a request nobody waits for any more
        else:
            if status not in REQUEST_ENDED:
                self.error = f"{status} {(headers or {}).get(DESCRIPTION, '')}".strip()
            self.ended.set()
