"""Shared reconnect replay: one read of the CHAT stream per room, not one per client.

When a gateway dies, thousands of its clients resume on the survivors at once, mostly in
the same rooms and from about the same seq. Reading each one's missed messages with its
own consumer would cost two JetStream consumers per client. Instead a gateway keeps, per
filter (a room's subject, and one for all DMs), a log of the messages from some seq `lo`
on: filled once from the stream, then extended by the live messages the hub receives
anyway (the hub calls `live` for each, with the subject's previous seq from
Nats-Last-Sequence, so a gap is noticed and the log dropped rather than trusted). A
client resuming after `lo` is then served from memory; one resuming before it makes one
read that extends the log backwards, shared by everyone waiting meanwhile.

What a replay returns is every logged message after the client's resume seq; messages
that reach the socket live while it is being answered (Session.live_buffer) are skipped
when the replay already had them, so the two together have each message exactly once.

A read reaches `replay_backfill` seqs further back than the client asked, so that the
clients of one storm, resuming from nearby seqs, are all covered by the first read.

Bounds: a log keeps at most `recovery_max_messages` messages and is dropped after
`replay_cache_ttl` seconds without a replay; DM messages are only decoded for the log
while a DM log exists (that is, shortly after a reconnect storm).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from chatlib import message_events, names
from chatlib.message_events import ChatEvent
from nats.js import JetStreamContext

from gateway import metrics, recovery
from gateway.batching import SharedRead
from gateway.frames import MessageFrames

log = logging.getLogger(__name__)

DM_FILTER = names.DM_ALL  # chat.dm.*.*
DM_PREFIX = DM_FILTER.removesuffix("*.*")
UNBOUNDED = 1 << 62


@dataclass
class _Log:
    """Every message on the filter with lo <= seq, up to what the hub delivered."""

    lo: int
    read_hi: int  # the stream read covered up to here
    # seq -> (subject, the message rendered at most twice for every client resuming)
    msgs: dict[int, tuple[str, MessageFrames]] = field(default_factory=dict)
    # subject -> last seq logged on it (a live message must follow on from it)
    tails: dict[str, int] = field(default_factory=dict)
    used: float = field(default_factory=time.monotonic)


@dataclass
class Replay:
    messages: list[MessageFrames]
    complete: bool
    after: int  # live messages at or below this seq were replaced by the replay


class SharedReplay:
    def __init__(self, js: JetStreamContext, max_messages: int, ttl: float, backfill: int) -> None:
        self.js = js
        # A read goes this many seqs further back than asked: the clients of a storm resume
        # from nearby but different seqs, and each one before the log's start would
        # otherwise cost a read of its own (one after the other, under the filter's lock).
        self.backfill = backfill
        self.max_messages = max_messages
        self.ttl = ttl
        self._logs: dict[str, _Log] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Live messages that arrived while a filter's log was being read: applied after.
        self._pending: dict[str, list[tuple[str, int, int, ChatEvent]]] = {}
        self._first_seq = SharedRead(self._read_first_seq)

    async def _read_first_seq(self) -> int:
        return (await self.js.stream_info(names.STREAM_CHAT)).state.first_seq

    # --- fed by the hub -------------------------------------------------------------
    def wants_dm(self) -> bool:
        return DM_FILTER in self._logs or DM_FILTER in self._pending

    def live(self, subject: str, previous: int, seq: int, msg: ChatEvent) -> None:
        """A live message the hub received on a chat subject (room or DM)."""
        key = DM_FILTER if subject.startswith(DM_PREFIX) else subject
        pending = self._pending.get(key)
        if pending is not None:
            pending.append((subject, previous, seq, msg))
            return
        entry = self._logs.get(key)
        if entry is not None:
            self._extend(key, entry, subject, previous, seq, msg)

    def _extend(
        self, key: str, entry: _Log, subject: str, previous: int, seq: int, msg: ChatEvent
    ) -> None:
        if seq <= entry.read_hi or seq in entry.msgs:
            return  # the stream read had it
        if previous > entry.read_hi and entry.tails.get(subject) != previous:
            # A message on this subject is missing from the log: stop trusting it.
            log.info("replay log of %s dropped at a gap (%d -> %d)", key, previous, seq)
            del self._logs[key]
            return
        entry.msgs[seq] = (subject, MessageFrames(msg, seq))
        entry.tails[subject] = seq
        if len(entry.msgs) > self.max_messages:
            oldest = min(entry.msgs)
            del entry.msgs[oldest]
            entry.lo = oldest + 1

    # --- answering a resuming client --------------------------------------------------
    async def replay(
        self, user: str, rooms: list[str], after: int, upto: int, limit: int
    ) -> Replay:
        """What `user` missed in `rooms` and its DMs after seq `after` (the stream's
        position `upto` was read after its live subscriptions were in place)."""
        if upto <= after:
            return Replay([], True, after)
        # Every await first, then one pass over the logs at one instant: a live message
        # that arrives later is later in the hub's (stream) order than all of them.
        room_logs = [await self._covering(names.room_subject(r), after + 1, upto) for r in rooms]
        dms = await self._covering(DM_FILTER, after + 1, upto)
        complete = after + 1 >= await self._first_seq.get()
        # Up to `upto` only: a message after it was published after the client's live
        # subscriptions were in place, so it reaches the socket live. A log read from the
        # stream may already hold it before the hub has handed it on; replaying it too
        # would send it twice (once here, once live after the replay).
        found: dict[int, MessageFrames] = {}
        for entry in room_logs:
            for seq, (_, msg) in entry.msgs.items():
                if after < seq <= upto:
                    found[seq] = msg
        for seq, (subject, msg) in dms.msgs.items():
            if after < seq <= upto and user in subject.split(".")[2:]:
                found[seq] = msg
        # Content deleted within the range is not replayed (message_events.honour_deletes).
        kept = message_events.honour_deletes({seq: f.msg for seq, f in found.items()})
        found = {seq: found[seq] for seq in kept}
        seqs = sorted(found)
        replay_after = after
        if len(seqs) > limit:
            seqs, complete = seqs[-limit:], False
            replay_after = seqs[0] - 1
        return Replay([found[s] for s in seqs], complete, replay_after)

    async def _covering(self, key: str, start: int, upto: int) -> _Log:
        """The log of `key`, read from the stream as far back as `start` if needed."""
        self._expire()
        lock = self._locks.setdefault(key, asyncio.Lock())
        while True:
            entry = self._logs.get(key)
            if entry is not None and entry.lo <= start:
                entry.used = time.monotonic()
                return entry
            async with lock:  # one read per filter at a time: the others then find it here
                entry = self._logs.get(key)
                if entry is not None and entry.lo <= start:
                    continue
                # A new log reads to the stream's end: the live messages from the moment
                # the read starts are queued in _pending, so nothing falls between them.
                read_to = UNBOUNDED if entry is None else entry.lo - 1
                read_from = max(1, start - self.backfill)
                self._pending.setdefault(key, [])
                try:
                    metrics.REPLAY_READS.inc()
                    msgs = await recovery.read_range(self.js, [key], read_from, read_to)
                finally:
                    pending = self._pending.pop(key, [])
                if entry is not None and self._logs.get(key) is not entry:
                    continue  # dropped at a gap while we read: start over
                if entry is None:
                    read_hi = max([upto, *msgs])
                    entry = self._logs[key] = _Log(lo=read_from, read_hi=read_hi)
                entry.lo = read_from
                for seq, msg in msgs.items():
                    subject = _subject_of(msg)
                    entry.msgs[seq] = (subject, MessageFrames(msg, seq))
                    if seq > entry.tails.get(subject, 0):
                        entry.tails[subject] = seq
                for subject, previous, seq, msg in pending:
                    if self._logs.get(key) is entry:
                        self._extend(key, entry, subject, previous, seq, msg)

    def dropped(self, subject: str) -> None:
        """The hub stopped following `subject`: its log would silently fall behind."""
        self._logs.pop(subject, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, e in self._logs.items() if now - e.used > self.ttl]:
            del self._logs[key]


def _subject_of(msg: ChatEvent) -> str:
    return message_events.subject_of(msg)
