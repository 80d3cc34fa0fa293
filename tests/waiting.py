"""Polling for a condition with a deadline: the tests' stand-in for sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_until(
    condition: Callable[[], object | Awaitable[object]],
    what: str,
    timeout: float = 10.0,
    interval: float = 0.02,
) -> object:
    """Poll `condition` (sync or async) until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        last = condition()
        if asyncio.iscoroutine(last) or isinstance(last, Awaitable):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what} (last: {last!r})")
        await asyncio.sleep(interval)
