"""Reading a range of the CHAT stream: for reconnect recovery (replay_cache.py, which
shares one read among every client resuming in the same rooms) and live-gap refills.

The client says the highest seq it saw; it gets its rooms' and DMs' messages after it.
At most `limit` messages, the newest ones: if more were missed, the replay is marked
incomplete and the client pages back through history for the rest.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from chatlib import codec, message_events, names
from chatlib.message_events import ChatEvent
from nats.js import JetStreamContext, api

log = logging.getLogger(__name__)

FETCH_BATCH = 256
FETCH_TIMEOUT = 2.0


@dataclass
class Replay:
    messages: list[tuple[int, ChatEvent]]
    complete: bool


def filter_groups(user: str, rooms: list[str]) -> list[list[str]]:
    """Filter subjects for reading a user's rooms and DMs. One consumer's filters may not
    overlap, and chat.dm.<user>.* overlaps chat.dm.*.<user> (at chat.dm.<user>.<user>): two."""
    mine, theirs = names.dm_subjects_of(user)
    return [[*(names.room_subject(r) for r in sorted(rooms)), mine], [theirs]]


async def replay(
    js: JetStreamContext, user: str, rooms: list[str], after_seq: int, upto_seq: int, limit: int
) -> Replay:
    if upto_seq <= after_seq:
        return Replay([], True)
    info = await js.stream_info(names.STREAM_CHAT)
    # Messages older than the stream's first one have aged out of the log.
    complete = after_seq + 1 >= info.state.first_seq
    found: dict[int, ChatEvent] = {}
    for subjects in filter_groups(user, rooms):
        found.update(await read_range(js, subjects, after_seq + 1, upto_seq))
    # Content deleted within the range is not replayed (the archive also removes deleted
    # messages from the log; this covers the moment before it has).
    found = message_events.honour_deletes(found)
    seqs = sorted(found)
    if len(seqs) > limit:
        seqs, complete = seqs[-limit:], False
    return Replay([(s, found[s]) for s in seqs], complete)


async def read_range(
    js: JetStreamContext, subjects: list[str], start: int, upto: int
) -> dict[int, ChatEvent]:
    """Messages on `subjects` (non-overlapping filters) with start <= seq <= upto."""
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        filter_subjects=subjects,
        ack_policy=api.AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    consumer = await js.add_consumer(names.STREAM_CHAT, config)
    pending = consumer.num_pending or 0
    out: dict[int, ChatEvent] = {}
    sub = await js.pull_subscribe_bind(consumer=consumer.name, stream=names.STREAM_CHAT)
    try:
        seen = 0
        done = pending == 0
        while not done:
            try:
                batch = await sub.fetch(min(FETCH_BATCH, pending - seen), timeout=FETCH_TIMEOUT)
            except TimeoutError:
                break
            for msg in batch:
                seen += 1
                seq = msg.metadata.sequence.stream
                if seq > upto:
                    done = True
                    break
                try:
                    out[seq] = message_events.decode_chat(msg.data, msg.headers)
                except codec.DecodeError as exc:
                    log.warning("skipping undecodable message seq %d: %s", seq, exc)
            if seen >= pending:
                done = True
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(names.STREAM_CHAT, consumer.name)
    return out
