"""The archive applies edits, deletes and reactions by CHAT sequence, not arrival order
(real Postgres; the worker's own write path, without NATS)."""

from __future__ import annotations

import itertools
import random

import asyncpg
import pytest
from archive import lifecycle
from archive.handlers import PoisonTask, Row, write_rows_pending
from archive.lifecycle import EventRow
from chatlib import codec, ids
from chatlib.proto.chat import v1 as pb

from tests.archive_fixtures import archive_db

__all__ = ["archive_db"]

WINDOW = 24 * 3600 * 1000
THUMBS = "\U0001f44d"


def message(mid: str, seq: int, sender: str = "alice") -> Row:
    return Row(mid, "dev", None, None, sender, "original", 1_000, seq)


def event(mid: str, seq: int, kind: str, actor: str = "alice", **fields: object) -> EventRow:
    values: dict[str, object] = dict(
        id=ids.new_id(), message_id=mid, kind=kind, room="dev", dm_lo=None, dm_hi=None,
        actor=actor, operator=False, content=None, emoji=None, removed=False, ts_ms=1_000 + seq,
        stream_seq=seq,
    )  # fmt: skip
    values.update(fields)
    return EventRow(**values)  # type: ignore[arg-type]


async def write(db: asyncpg.Pool, items: list[Row | EventRow]) -> None:
    """What ArchiveWorker.write does with a batch (minus removing content from NATS)."""
    rows = [i for i in items if isinstance(i, Row)]
    events = [i for i in items if isinstance(i, EventRow)]
    _, pending = await write_rows_pending(db, rows)
    await lifecycle.record(db, events)
    await lifecycle.apply_pending(db, {*pending, *(e.message_id for e in events)}, WINDOW)


async def state(db: asyncpg.Pool, mid: str) -> tuple[object, ...]:
    row = await db.fetchrow(
        "SELECT content, edited_at_ms, version_seq, deleted FROM messages WHERE id = $1", mid
    )
    reactions = await db.fetch(
        "SELECT user_name, emoji FROM reactions WHERE message_id = $1 AND present"
        " ORDER BY user_name, emoji",
        mid,
    )
    assert row is not None
    return (*row.values(), [tuple(r.values()) for r in reactions])


async def test_edits_and_reactions_end_in_the_same_state_whatever_the_arrival_order(
    archive_db: asyncpg.Pool,
) -> None:
    """Every order of: the message (seq 1), two edits (3, 5), bob's reaction added (2) and
    removed (4), carol's reaction (6), one item delivered twice."""
    expected: tuple[object, ...] | None = None
    orders = list(itertools.permutations(range(6)))
    for order in [*random.Random(14).sample(orders, 40), tuple(range(6))]:
        mid = ids.new_id()
        items: list[Row | EventRow] = [
            message(mid, 1),
            event(mid, 3, "edit", content="second"),
            event(mid, 5, "edit", content="third"),
            event(mid, 2, "react", actor="bob", emoji=THUMBS),
            event(mid, 4, "react", actor="bob", emoji=THUMBS, removed=True),
            event(mid, 6, "react", actor="carol", emoji=THUMBS),
        ]
        shuffled = [items[i] for i in order]
        for item in [*shuffled, shuffled[0]]:  # one at a time, the first one twice
            await write(archive_db, [item])
        got = await state(archive_db, mid)
        assert got == ("third", 1_005, 5, False, [("carol", THUMBS)]), order
        expected = expected or got


async def test_a_delete_wins_over_edits_before_or_after_it_in_any_order(
    archive_db: asyncpg.Pool,
) -> None:
    for order in itertools.permutations(range(4)):
        mid = ids.new_id()
        items: list[Row | EventRow] = [
            message(mid, 1),
            event(mid, 2, "edit", content="secret v2"),
            event(mid, 3, "delete"),
            event(mid, 4, "edit", content="secret v3"),  # a late edit after the delete
        ]
        await write(archive_db, [items[i] for i in order])
        assert await state(archive_db, mid) == ("", None, 0, True, [])
        # No text of the deleted message is kept anywhere, edits included.
        texts = await archive_db.fetch(
            "SELECT content FROM message_events WHERE message_id = $1 AND content IS NOT NULL",
            mid,
        )
        assert texts == [], order


async def test_a_redelivered_delete_names_the_content_to_remove_from_the_log_again(
    archive_db: asyncpg.Pool,
) -> None:
    """An archive killed after committing a delete but before removing the content from
    CHAT gets the delete again: it must name the same log entries to remove once more."""
    mid = ids.new_id()
    delete = event(mid, 3, "delete")
    await write(archive_db, [message(mid, 1), event(mid, 2, "edit", content="secret v2")])
    await lifecycle.record(archive_db, [delete])
    first = await lifecycle.apply_pending(archive_db, {mid}, WINDOW)
    assert sorted(first) == [1, 2]
    # The crash: nothing was removed. The redelivered delete is recorded already.
    await lifecycle.record(archive_db, [delete])
    again = await lifecycle.apply_pending(archive_db, {mid}, WINDOW)
    assert sorted(again) == [1, 2]
    assert await state(archive_db, mid) == ("", None, 0, True, [])
    # A message that is not deleted names nothing, however often it is asked about.
    kept = ids.new_id()
    await write(archive_db, [message(kept, 5)])
    assert await lifecycle.apply_pending(archive_db, {kept}, WINDOW) == []


async def test_forged_events_are_recorded_as_refused_and_change_nothing(
    archive_db: asyncpg.Pool,
) -> None:
    mid = ids.new_id()
    await write(archive_db, [message(mid, 1)])
    forged = [
        event(mid, 2, "edit", actor="mallory", content="pwned"),
        event(mid, 3, "delete", actor="mallory"),
        event(mid, 4, "edit", room="elsewhere", content="moved"),
        event(mid, 5, "edit", content="too late", ts_ms=1_000 + WINDOW + 1),
    ]
    await write(archive_db, forged)
    assert await state(archive_db, mid) == ("original", None, 0, False, [])
    refused = await archive_db.fetch(
        "SELECT refused FROM message_events WHERE message_id = $1 ORDER BY stream_seq", mid
    )
    assert all(r["refused"] for r in refused) and len(refused) == 4
    # An operator may delete someone else's message.
    await write(archive_db, [event(mid, 6, "delete", actor="oscar", operator=True)])
    assert (await state(archive_db, mid))[3] is True


async def test_a_dm_reaction_by_an_outsider_is_refused(archive_db: asyncpg.Pool) -> None:
    mid = ids.new_id()
    dm = Row(mid, None, "alice", "bob", "alice", "hi", 1_000, 1)
    outsider = event(mid, 2, "react", actor="carol", room=None, dm_lo="alice", dm_hi="carol",
                     emoji=THUMBS)  # fmt: skip
    forged_pair = event(mid, 3, "react", actor="carol", room=None, dm_lo="alice", dm_hi="bob",
                        emoji=THUMBS)  # fmt: skip
    fine = event(mid, 4, "react", actor="bob", room=None, dm_lo="alice", dm_hi="bob", emoji=THUMBS)
    await write(archive_db, [dm, outsider, forged_pair, fine])
    assert (await state(archive_db, mid))[4] == [("bob", THUMBS)]


def test_a_lifecycle_event_that_did_not_come_through_chat_or_is_malformed_is_poison() -> None:
    """Parked in the dead letters rather than applied: order comes from the CHAT sequence,
    and only the known emoji are reactions."""
    sourced = {"Nats-Stream-Source": "CHAT 42 > >"}
    edit = pb.MessageEdit(id=ids.new_id(), message_id=ids.new_id(), room="dev", sender="alice",
                          content="x", ts_ms=1)  # fmt: skip
    data, headers = codec.encode(edit)
    assert lifecycle.event_row(data, {**headers, **sourced}).stream_seq == 42
    with pytest.raises(PoisonTask, match="CHAT"):
        lifecycle.event_row(data, headers)  # published straight on archive.tasks
    bad = [
        pb.ReactionChange(id=ids.new_id(), message_id=ids.new_id(), room="dev", sender="a",
                          emoji="<script>"),
        pb.MessageDelete(id="nope", message_id=ids.new_id(), room="dev", sender="a"),
        pb.MessageDelete(id=ids.new_id(), message_id=ids.new_id(), sender="a"),  # nowhere
        pb.MessageEdit(id=ids.new_id(), message_id=ids.new_id(), room="dev", sender="a",
                       content="nul\x00"),
    ]  # fmt: skip
    for event in bad:
        data, headers = codec.encode(event)
        with pytest.raises(PoisonTask):
            lifecycle.event_row(data, {**headers, **sourced})
