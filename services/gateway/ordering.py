"""Live chat messages handed on in stream order across subscriptions.

The gateway subscribes per room (and once for all DMs). nats-py runs each subscription's
callbacks in its own task, and a task drains its whole backlog before the next task
runs, so after a busy moment a socket in two rooms could get seq 22 (room B) before 21
(room A). A client resumes from the highest seq it saw, so a gateway dying between the
two would lose 21 for it for good.

The fix rests on one fact: NATS sends our messages over one socket in stream order, and
nats-py queues each one as it reads it. So once every subscription's queue is empty,
everything read so far has reached us, and ordering what we hold by seq is stream order.
The subscription callbacks only file messages here; one task hands them on. On the
services' client (chatlib.nats_client.subscribe_handler) they file each message as it is
read, so those subscriptions' queues stay empty and the rule holds all the more.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable

from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

# Loop turns to wait for the subscriptions' queues to empty before handing on anyway
# (only a flood that never pauses gets there; order then degrades to per room).
MAX_SETTLE_TURNS = 50

Work = Callable[[], Awaitable[None]]


class StreamOrder:
    def __init__(self, subscriptions: Callable[[], Iterable[Subscription]]) -> None:
        self._subscriptions = subscriptions
        self._heap: list[tuple[int, int, Work]] = []
        self._tiebreak = itertools.count()  # equal seqs (unparsable: 0) keep arrival order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def file(self, seq: int, work: Work) -> None:
        """Called from a subscription callback: `work` runs in stream order."""
        heapq.heappush(self._heap, (seq, next(self._tiebreak), work))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-stream-order")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._settle()
            while self._heap:
                _, _, work = heapq.heappop(self._heap)
                try:
                    await work()
                except Exception:  # one bad message must not stop delivery
                    log.exception("live delivery failed")

    async def _settle(self) -> None:
        """Let every subscription hand over what nats-py has queued for it."""
        for _ in range(MAX_SETTLE_TURNS):
            if not any(sub.pending_msgs for sub in self._subscriptions()):
                return
            await asyncio.sleep(0)
