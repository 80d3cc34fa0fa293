"""Token expiry timers (gateway/reauth.py): sockets whose tokens expire in the same second
share one timer, and each is still closed with 4401 at its token's expiry."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway import frames, reauth
from gateway.session import Session
from gateway.settings import GatewaySettings


def _session(user: str, sent: list[dict[str, Any]]) -> Session:
    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    return Session(user, send, GatewaySettings())


async def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_sessions_expiring_in_one_second_share_a_timer_and_are_closed() -> None:
    sent: list[dict[str, Any]] = []
    expires_at = float(int(time.time()) + 1)
    a, b, c = (_session(user, sent) for user in ("ann", "bob", "cid"))
    for session in (a, b, c):
        reauth.schedule_expiry(session, expires_at)
    assert a.expiry == b.expiry == c.expiry
    assert len(reauth._buckets[int(expires_at)][2]) == 3
    reauth.cancel_expiry(c)  # c's socket closed meanwhile: it is no longer tracked
    assert c not in reauth._buckets[int(expires_at)][2]
    await _until(lambda: a.close_code is not None and b.close_code is not None)
    assert a.close_code == b.close_code == frames.CLOSE_UNAUTHORIZED
    assert c.close_code is None and not c.closing
    assert int(expires_at) not in reauth._buckets


async def test_a_renewed_token_moves_the_session_and_the_last_one_out_drops_the_timer() -> None:
    sent: list[dict[str, Any]] = []
    session = _session("dee", sent)
    soon = float(int(time.time()) + 2)
    reauth.schedule_expiry(session, soon)
    handle = reauth._buckets[int(soon)][1]
    later = soon + 3600
    reauth.schedule_expiry(session, later)  # an auth frame with a fresh token
    assert int(soon) not in reauth._buckets and handle.cancelled()
    assert session.expiry == int(later) and session.expires_at == later
    reauth.cancel_expiry(session)
    assert int(later) not in reauth._buckets and session.expiry is None
