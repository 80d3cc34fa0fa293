"""Guest names that cannot be impersonated.

In guest mode anyone may pick a name, so a name is *held*: the first person to ask for
`alice` gets a token bound to a reservation (the token's `jti`, "holder"), and anyone
else asking for `alice` gets `name_taken` while the reservation lives.

The reservations live in a JetStream KV bucket shared by every gateway (key: the name,
value: the holder). The gateways take and refresh them; the rpc service checks them
on every call made with a guest token (and takes a lapsed one back while it is free).
The bucket's max age is the hold time (settings.guest_hold): a
reservation lapses unless refreshed. Every gateway refreshes, every guest_hold/3
seconds, the reservations of the guests connected to it. So a name is held while any
session of its holder is alive anywhere, and for guest_hold seconds after the last one
ends (a reload or a reconnect keeps the name); a crashed gateway stops refreshing and
its guests' names lapse on their own. A token whose reservation lapsed works again if the
name is still free (the hello takes the reservation back), never once someone else holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chatlib import names, nats_wiring

log = logging.getLogger(__name__)

# How often a hold is refreshed, as a fraction of the hold time: two refreshes may be
# lost (a NATS hiccup) before a live guest's name lapses.
REFRESHES_PER_HOLD = 3
CLAIM_ATTEMPTS = 3


class NameTaken(Exception):
    """Someone else holds the name."""


async def ensure_bucket(js: JetStreamContext, hold_seconds: float, replicas: int) -> KeyValue:
    description = "Guest name reservations: name -> holder (the token's jti)"
    bucket = names.KV_GUEST_NAMES
    return await nats_wiring.ensure_kv(js, bucket, description, replicas, hold_seconds)


class GuestNames:
    def __init__(
        self, js: JetStreamContext, kv: KeyValue, hold_seconds: float, replicas: int
    ) -> None:
        self.js, self.kv = js, kv
        self.hold_seconds, self.replicas = hold_seconds, replicas
        self._task: asyncio.Task[None] | None = None
        # name -> (holder, when we last wrote the hold, its revision then): a hold
        # written less than a refresh interval ago cannot have lapsed, so a reconnect or
        # a second tab of the same guest needs no round trip to JetStream; an older one
        # is rewritten on that revision in one step (no read first) while nobody else
        # wrote the key since.
        self._confirmed: dict[str, tuple[str, float, int]] = {}

    async def reserve(self, name: str, holder: str) -> None:
        """Hold `name` for `holder` (new or refreshed); NameTaken if another holds it."""
        known = self._confirmed.get(name)
        last = 0
        if known is not None and known[0] == holder:
            if time.monotonic() - known[1] < self.hold_seconds / REFRESHES_PER_HOLD:
                return
            last = known[2]
        written = time.monotonic()
        try:
            revision = await self._write(name, holder, last)
        except (NameTaken, KeyWrongLastSequenceError):
            raise
        except Exception as exc:
            # The bucket may be gone (an operator removed it, a test wiped the server):
            # make it again once, then try again. Other trouble propagates (fail closed).
            log.info("guest names bucket unusable (%s): provisioning it again", exc)
            self.kv = await ensure_bucket(self.js, self.hold_seconds, self.replicas)
            revision = await self._write(name, holder)
        self._confirmed[name] = (holder, written, revision)

    async def _write(self, name: str, holder: str, last: int = 0) -> int:
        """Hold `name` for `holder`; returns the revision written. `last`: the revision
        of our own last write of this hold, if any."""
        value = holder.encode()
        if last:
            try:
                # Still our write (nobody wrote the key since, it did not lapse): the
                # value is ours, rewrite it without reading it first.
                return await self.kv.update(name, value, last=last)
            except KeyWrongLastSequenceError:
                pass  # written since (or lapsed): look at it as for any hold
        for _ in range(CLAIM_ATTEMPTS):
            try:
                entry = await self.kv.get(name)
            except KeyNotFoundError:  # free (never held, lapsed, or deleted)
                try:
                    return await self.kv.create(name, value)
                except KeyWrongLastSequenceError:
                    continue  # taken a moment ago: look again
            if entry.value != value:
                raise NameTaken(name)
            try:
                # Rewriting the same value restarts the max-age clock.
                return await self.kv.update(name, value, last=entry.revision)
            except KeyWrongLastSequenceError:
                continue  # another gateway refreshed it at the same time: look again
        raise NameTaken(name)

    def start(self, live_holds: Callable[[], Iterable[tuple[str, str]]],
              lost: Callable[[str, str], None]) -> None:  # fmt: skip
        """Refresh the holds of live sessions (`live_holds`: (name, holder) pairs) until
        stop; `lost(name, holder)` for a hold someone else has taken meanwhile."""
        self._task = asyncio.create_task(self._refresh_loop(live_holds, lost), name="guest-names")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh_loop(
        self,
        live_holds: Callable[[], Iterable[tuple[str, str]]],
        lost: Callable[[str, str], None],
    ) -> None:
        interval = self.hold_seconds / REFRESHES_PER_HOLD
        while True:
            await asyncio.sleep(interval)
            live = set(live_holds())
            # Forget names nobody here uses any more; the others are due (their write
            # time is cleared) and keep their revision for a one-step rewrite.
            self._confirmed = {
                name: (holder, -math.inf, revision)
                for name, (holder, _, revision) in self._confirmed.items()
                if (name, holder) in live
            }
            for name, holder in live:
                try:
                    await self.reserve(name, holder)
                except NameTaken:
                    log.warning("guest name lost to another holder", extra={"user": name})
                    lost(name, holder)
                except Exception as exc:  # NATS trouble: try again next round
                    log.info("cannot refresh guest name %s: %s", name, exc)
