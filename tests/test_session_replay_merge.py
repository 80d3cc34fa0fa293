"""A resuming socket gets each message once, in order, however far the replay's log was
ahead of the live subscription (gateway/session.py, pure logic: no socket, no NATS).

A room's replay log may be read straight from the stream while the hub has not yet
handed the newest messages on; when the hub then delivers them, they were already
replayed and must not go out again (the storm bench counted such duplicates)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.session import Session
from gateway.settings import GatewaySettings


def _session(sent: list[str]) -> Session:
    async def send(event: dict[str, Any]) -> None:
        sent.append(event["text"])

    return Session("bob", send, GatewaySettings())


async def _until_count(sent: list[str], n: int) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while len(sent) < n:
        assert asyncio.get_running_loop().time() < deadline, f"only {sent}"
        await asyncio.sleep(0.01)


async def test_replayed_messages_the_hub_hands_on_later_are_not_sent_again() -> None:
    sent: list[str] = []
    session = _session(sent)
    session.deliver_live(5, "m5")  # came live while hello was being answered
    session.end_buffering(2, [(3, "m3"), (4, "m4"), (5, "m5"), (6, "m6")])
    session.deliver_live(6, "m6")  # the hub catches up: replayed already
    session.deliver_live(7, "m7")
    session.deliver_live(8, "m8")
    await _until_count(sent, 6)
    # Frames are queued synchronously by the calls above: nothing else is waiting.
    assert not session._backlog
    assert sent == ["m3", "m4", "m5", "m6", "m7", "m8"]


async def test_once_live_is_past_the_replay_every_message_goes_out() -> None:
    sent: list[str] = []
    session = _session(sent)
    # 3 and 4 were handed on long before this socket joined: they never come live again.
    session.end_buffering(2, [(3, "m3"), (4, "m4")])
    session.deliver_live(9, "m9")
    session.deliver_live(10, "m10")
    await _until_count(sent, 4)
    assert sent == ["m3", "m4", "m9", "m10"]
    assert session._replayed_ahead is None  # nothing kept once live passed the replay
