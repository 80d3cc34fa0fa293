"""Search never returns a DM of someone else or a message of a room the requester is not
in (property test over users, rooms and messages; real Postgres, the archive's query)."""

from __future__ import annotations

import asyncpg
from archive import lifecycle
from archive.handlers import Row, write_rows
from chatlib import ids, names
from chatlib.proto.chat import v1 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.archive_fixtures import archive_db

__all__ = ["archive_db"]

USERS = ["alice", "bob", "carol", "dave"]
ROOMS = ["dev", "ops", "fun"]

room_messages = st.tuples(st.just("room"), st.sampled_from(USERS), st.sampled_from(ROOMS))
dm_messages = st.tuples(st.just("dm"), st.sampled_from(USERS), st.sampled_from(USERS)).filter(
    lambda m: m[1] != m[2]
)
messages = st.lists(
    st.tuples(st.one_of(room_messages, dm_messages), st.booleans()), min_size=1, max_size=30
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    sent=messages,
    requester=st.sampled_from(USERS),
    joined=st.sets(st.sampled_from(ROOMS)),
    limit=st.integers(min_value=1, max_value=7),
)
async def test_search_returns_exactly_what_the_requester_may_read_newest_first(
    archive_db: asyncpg.Pool,
    sent: list[tuple[tuple[str, str, str], bool]],
    requester: str,
    joined: set[str],
    limit: int,
) -> None:
    await archive_db.execute("TRUNCATE messages, message_events, reactions")
    rows, readable = [], []
    for (kind, sender, where), deleted in sent:
        mid = ids.new_id()
        if kind == "room":
            row = Row(mid, where, None, None, sender, f"needle in {where}", 1, None)
            visible = where in joined
        else:
            lo, hi = names.dm_pair(sender, where)
            row = Row(mid, None, lo, hi, sender, f"needle between {lo} {hi}", 1, None)
            visible = requester in (lo, hi)
        rows.append((row, deleted))
        if visible and not deleted:
            readable.append(mid)
    await write_rows(archive_db, [row for row, _ in rows])
    gone = [row.id for row, deleted in rows if deleted]
    await archive_db.execute(
        "UPDATE messages SET deleted = true, content = '' WHERE id = ANY($1)", gone
    )

    found: list[str] = []
    before = ""
    while True:  # page through everything
        request = pb.SearchRequest(
            requester=requester, rooms=sorted(joined), query="needle", before_id=before,
            limit=limit,
        )  # fmt: skip
        page = pb.SearchPage.parse(await lifecycle.search(archive_db, request))
        assert len(page.hits) <= limit
        for hit in page.hits:
            assert hit.message is not None
            message = hit.message
            if message.room:
                assert message.room in joined, (requester, joined, message)
            else:
                assert requester in (message.sender, message.dm_peer), (requester, message)
            assert "\ue000needle\ue001" in hit.snippet
            found.append(message.id)
        if not page.has_more:
            break
        before = found[-1]
    assert found == sorted(readable, reverse=True)  # newest first, nothing missing, no dup
