"""One heartbeat per gateway at a time, and only the newest one waiting.

A heartbeat lists every connection of its gateway, so a newer one supersedes an older
one that was not handled yet. Handling them one at a time per gateway keeps two handlers of
the same gateway from racing each other's compare-and-set writes on the same users: under
load (a reconnect storm, when one heartbeat takes longer than the interval) that race
turned every write into a retry.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class LatestPerKey(Generic[T]):
    def __init__(self, handle: Callable[[T], Awaitable[None]]) -> None:
        self._handle = handle
        # key -> the newest item waiting while that key's handler runs (None: none waits).
        self._running: dict[str, T | None] = {}

    def offer(self, key: str, item: T) -> bool:
        """Keep `item` for `key`. True: the caller should now run `drain(key, item)`;
        False: a handler for `key` is running and will take `item` (replacing an older
        waiting one) when it is done."""
        if key in self._running:
            self._running[key] = item
            return False
        self._running[key] = None
        return True

    async def drain(self, key: str, item: T) -> None:
        """Handle `item`, then whatever newest item arrived for `key` meanwhile."""
        try:
            while True:
                try:
                    await self._handle(item)
                except Exception:
                    log.exception("presence report failed (the next heartbeat repairs it)")
                waiting = self._running.get(key)
                if waiting is None:
                    return
                self._running[key] = None
                item = waiting
        finally:
            self._running.pop(key, None)
