"""Heartbeats of one gateway are handled one at a time, newest waiting only (pure logic).

Two handlers of the same gateway's heartbeats raced each other's compare-and-set writes
on the same users during a reconnect storm; a heartbeat lists all of its gateway's
connections, so a newer one makes an unhandled older one useless.
"""

from __future__ import annotations

import asyncio

from presence.latest import LatestPerKey


async def _run(latest: LatestPerKey[str], key: str, item: str) -> asyncio.Task[None] | None:
    if latest.offer(key, item):
        return asyncio.create_task(latest.drain(key, item))
    return None


async def test_a_running_key_keeps_only_the_newest_waiting_item() -> None:
    handled: list[str] = []
    release = asyncio.Event()

    async def handle(item: str) -> None:
        handled.append(item)
        if item == "gw-a:1":
            await release.wait()

    latest: LatestPerKey[str] = LatestPerKey(handle)
    first = await _run(latest, "gw-a", "gw-a:1")
    await asyncio.sleep(0)  # the first handler is now waiting on `release`
    assert await _run(latest, "gw-a", "gw-a:2") is None
    assert await _run(latest, "gw-a", "gw-a:3") is None
    other = await _run(latest, "gw-b", "gw-b:1")  # another gateway is not held up
    assert other is not None
    await other
    assert handled == ["gw-a:1", "gw-b:1"]
    release.set()
    assert first is not None
    await first
    assert handled == ["gw-a:1", "gw-b:1", "gw-a:3"]
    # Idle again: the next heartbeat starts its own handler.
    again = await _run(latest, "gw-a", "gw-a:4")
    assert again is not None
    await again
    assert handled[-1] == "gw-a:4"


async def test_a_failing_handler_still_hands_on_the_waiting_item() -> None:
    handled: list[str] = []
    release = asyncio.Event()

    async def handle(item: str) -> None:
        handled.append(item)
        if item == "1":
            await release.wait()
            raise RuntimeError("NATS timeout")

    latest: LatestPerKey[str] = LatestPerKey(handle)
    first = await _run(latest, "gw", "1")
    await asyncio.sleep(0)
    assert await _run(latest, "gw", "2") is None
    release.set()
    assert first is not None
    await first
    assert handled == ["1", "2"]
    third = await _run(latest, "gw", "3")
    assert third is not None
    await third
    assert handled == ["1", "2", "3"]
