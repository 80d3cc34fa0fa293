"""Reading a range of the CHAT stream: for reconnect recovery (replay_cache.py, which
shares one read among every client resuming in the same rooms) and live-gap refills.

The client says the highest seq it saw; it gets its rooms' and DMs' messages after it.
At most `limit` messages, the newest ones: if more were missed, the replay is marked
incomplete and the client pages back through history for the rest.
"""

from __future__ import annotations

import contextlib
import logging

from chatlib import codec, names
from chatlib.proto.chat import v1 as pb
from nats.js import JetStreamContext, api

log = logging.getLogger(__name__)

FETCH_BATCH = 256
FETCH_TIMEOUT = 2.0


def filter_groups(user: str, rooms: list[str]) -> list[list[str]]:
    """Filter subjects for reading a user's rooms and DMs. One consumer's filters may not
    overlap, and chat.dm.<user>.* overlaps chat.dm.*.<user> (at chat.dm.<user>.<user>): two."""
    mine, theirs = names.dm_subjects_of(user)
    return [[*(names.room_subject(r) for r in sorted(rooms)), mine], [theirs]]


async def read_range(
    js: JetStreamContext, subjects: list[str], start: int, upto: int
) -> dict[int, pb.ChatMessage]:
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
    out: dict[int, pb.ChatMessage] = {}
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
                    out[seq] = codec.decode_as(pb.ChatMessage, msg.data, msg.headers)
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
