"""Reconnect delays for our clients (chatctl, the bench's load generator; the page has the
same rule in static/backoff.js): full-jitter exponential backoff that honours a server's
Retry-After.

Full jitter (a uniformly random delay between 0 and the exponential cap) spreads
thousands of clients that lost the same gateway at the same instant over the whole
window, instead of sending them back in synchronized waves. A Retry-After from a busy
gateway (HTTP 503 before the upgrade) is the client's turn, which the gateway spreads
over its refused clients at the pace it greets (gateway/admission.py): the client waits
that long plus a random share of one second, so those given the same whole second do not
all return at its start.
"""

from __future__ import annotations

import random
from collections.abc import Callable

BASE_S = 0.5
CAP_S = 15.0


def delay(
    attempt: int,
    retry_after: float | None = None,
    base: float = BASE_S,
    cap: float = CAP_S,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before reconnect attempt number `attempt` (0 for the first)."""
    wait = rand() * min(cap, base * 2 ** min(attempt, 30))
    if retry_after is not None and retry_after > 0:
        wait = max(wait, retry_after + rand())
    return wait
