"""Keeping a reconnect storm from collapsing the gateway: bounded hello admission and a
short cache of token checks.

At most `hello_concurrency` hellos are answered at once (welcome, replay); up to
`hello_queue` more wait for a turn. Beyond that a new WebSocket is refused before the
upgrade (and once the greeting rate is known, beyond what it greets in QUEUE_SECONDS)
with HTTP 503 and a `Retry-After` (at least `hello_retry_after` seconds). The queue is
kept short so that a socket admitted is greeted well within a client's patience (a hello
answered after the client gave up is work thrown away, and a retry on top).

Each refused client is given its own turn: the first ones come back when the queue has
drained, each next one 1/rate later, so the refused return at the pace the gateway
greets. One Retry-After for all (the drain time) brought them back together, to be
refused again, or spread over [RA, 2 RA] by the clients' jitter, which left the gateway
idle while the last of them waited (a storm's tail at ~2 x RA). Our clients wait
Retry-After plus a random share of one second (chatlib/backoff.py), which spreads the
clients given the same whole second over it.

A verified token is remembered for `token_cache_ttl` seconds (never past its own `exp`):
a storm is the same clients with the same tokens, reconnecting.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from chatlib.auth import Authenticator, Identity

from gateway import metrics, reauth

TOKEN_CACHE_MAX = 50_000
# Once the greeting rate is known, no more sockets wait than can be greeted in this many
# seconds: well within a client's patience (our clients wait 10-30 s for welcome/resumed).
QUEUE_SECONDS = 10.0
# The longest Retry-After. Turns past it are not handed out: a client refused then is
# told to come back in RETRY_AFTER_MAX s and gets a turn then (a storm of 5,000 at a few
# hundred greetings a second fits well within it).
RETRY_AFTER_MAX = 30
# The greeting rate is measured over windows this long (and smoothed).
RATE_WINDOW_S = 1.0


class Admission:
    """Sockets accepted and not yet greeted hold a ticket; at most `concurrency` tickets
    are being answered at once (their turn), the others wait."""

    def __init__(
        self,
        concurrency: int,
        queue: int,
        retry_after: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._limit = concurrency + queue
        self._retry_after = retry_after
        self._clock = clock
        self.pending = 0
        # Hellos greeted per second while hellos were waiting, smoothed: how fast the
        # queue drains (0: never measured; then only the fixed limit applies).
        self._rate = 0.0
        self._count = 0
        self._since = clock()
        # When the last turn handed to a refused client starts (clock time).
        self._booked_until = 0.0

    def full(self) -> bool:
        """No room even to wait: refuse the handshake (503)."""
        if self.pending >= self._limit:
            return True
        return self._rate > 0 and self.pending >= self._concurrency + self._rate * QUEUE_SECONDS

    def retry_after(self) -> int:
        """Seconds a refused client should stay away, booking its turn: after the queue
        has drained and after the turns already handed out, at the current greeting
        rate; at least the setting, at most RETRY_AFTER_MAX. Before the rate is known,
        the setting (the refused come back once it has been measured)."""
        if self._rate <= 0:
            return self._retry_after
        now = self._clock()
        turn = max(now + self.pending / self._rate, self._booked_until)
        if turn - now >= RETRY_AFTER_MAX:
            return RETRY_AFTER_MAX
        self._booked_until = turn + 1 / self._rate
        # The whole second the turn falls in: the client's random share of a second
        # (chatlib/backoff.py) spreads those given it over that second.
        return max(self._retry_after, int(turn - now))

    def greeted(self) -> None:
        now = self._clock()
        # Only a gateway with hellos waiting shows how fast it greets: an idle stretch
        # measures how few clients came, not how many it could take, and that stale low
        # rate refused a storm's first wave with a Retry-After of 30 s (every client back
        # only after 30-60 s). (`pending` still counts this hello.)
        if self.pending <= self._concurrency:
            self._count, self._since = 0, now
            return
        self._count += 1
        if now - self._since >= RATE_WINDOW_S:
            rate = self._count / (now - self._since)
            self._rate = rate if self._rate == 0 else 0.5 * self._rate + 0.5 * rate
            self._count, self._since = 0, now

    def ticket(self) -> Ticket:
        if self.pending == self._concurrency:
            # Hellos start waiting now: the greeting rate is measured from here. (From the
            # last greeting before, minutes ago at startup, it read 0.1 a second and sent
            # a storm's refused clients away for the longest Retry-After.)
            self._count, self._since = 0, self._clock()
        return Ticket(self)


class Ticket:
    __slots__ = ("_admission", "_done", "_turn")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._turn = False
        self._done = False
        admission.pending += 1
        metrics.HELLO_WAITING.set(admission.pending)

    async def turn(self) -> None:
        """Wait until this hello may be answered."""
        await self._admission._slots.acquire()
        self._turn = True

    def done(self) -> None:
        """Greeted (or gone): free the place. Safe to call twice."""
        if self._done:
            return
        self._done = True
        if self._turn:
            self._admission.greeted()
        self._admission.pending -= 1
        metrics.HELLO_WAITING.set(self._admission.pending)
        if self._turn:
            self._admission._slots.release()


class TokenCache:
    """Token checks (gateway.reauth.identify), remembered briefly per token."""

    def __init__(self, auth: Authenticator, ttl: float) -> None:
        self.auth, self.ttl = auth, ttl
        self._known: OrderedDict[str, tuple[Identity, float]] = OrderedDict()

    async def identify(self, token: object) -> Identity:
        now = time.time()
        if isinstance(token, str):
            cached = self._known.get(token)
            if cached is not None and cached[1] > now:
                return cached[0]
        identity = await reauth.identify(self.auth, token)  # AuthError: nothing cached
        if self.ttl > 0 and isinstance(token, str):
            self._known[token] = (identity, min(now + self.ttl, identity.expires_at))
            if len(self._known) > TOKEN_CACHE_MAX:
                self._known.popitem(last=False)
        return identity
