"""Share one NATS round trip among the hellos that need the same answer at once.

A hello needs the CHAT stream's last seq and who is online, both read *after* its live
subscriptions are in place (docs/gateway.md). Callers wait for the next read that has not
been sent yet: while one read is out, everyone arriving meanwhile joins the one after it.
A read already sent never takes new callers (it might be answered from before their
subscriptions), so each answer is as fresh as a read of their own; an idle gateway reads
at once, a busy one makes about one read per round trip, not one per hello.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedRead(Generic[T]):
    def __init__(self, read: Callable[[], Awaitable[T]]) -> None:
        self._read = read
        self._next: asyncio.Future[T] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def get(self) -> T:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        waiting = self._next
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_while_asked())
        return await asyncio.shield(waiting)

    async def _read_while_asked(self) -> None:
        try:
            while self._next is not None:
                # Taken: from here on, new callers wait for the next read.
                result, self._next = self._next, None
                try:
                    value = await self._read()
                except asyncio.CancelledError:
                    result.cancel()
                    raise
                except Exception as exc:
                    result.set_exception(exc)
                    result.exception()  # the callers get it through await
                else:
                    result.set_result(value)
        finally:
            self._reader = None
