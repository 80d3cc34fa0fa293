"""The archive's logic against a real Postgres, without NATS: migrations, idempotent batch
writes, task decoding, history paging and DM authorization."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from archive import handlers, migrations
from archive.handlers import PoisonTask, Row, dm_history, room_history, task_row, write_rows
from archive.worker import times_delivered
from chatlib import codec, ids, names
from chatlib.proto.chat import v1 as pb
from nats.aio.msg import Msg
from nats.micro.request import ServiceError

from tests import archive_fixtures

archive_db = archive_fixtures.archive_db  # the fixture, under its name in this module

SAME_MS = 1_700_000_000_123


def room_row(room: str, content: str, sender: str = "alice", ts_ms: int = SAME_MS) -> Row:
    msg = pb.ChatMessage(
        id=ids.new_id(ts_ms), room=room, sender=sender, content=content, ts_ms=ts_ms
    )
    return handlers.message_row(msg)


def dm_row(sender: str, peer: str, content: str) -> Row:
    msg = pb.ChatMessage(
        id=ids.new_id(), dm_peer=peer, sender=sender, content=content, ts_ms=SAME_MS
    )
    return handlers.message_row(msg)


# --- migrations -------------------------------------------------------------------------


async def test_migrations_apply_once_even_when_replicas_start_together(database_url: str) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(migrations.migrate(c) for c in conns))
        versions = [v for v, _ in migrations.available()]
        # Exactly one of the racers applied each migration; the others found it recorded.
        assert sorted(v for batch in applied for v in batch) == versions
        recorded = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY 1")
        assert [r["version"] for r in recorded] == versions
        assert await migrations.migrate(conns[0]) == []  # a restart applies nothing
    finally:
        for conn in conns:
            await conn.close()


async def explain(conn: object, query: str) -> str:
    rows = await conn.fetch(f"EXPLAIN {query}")  # type: ignore[attr-defined]
    return "\n".join(r[0] for r in rows)


async def test_history_queries_use_the_paging_indexes(archive_db: asyncpg.Pool) -> None:
    await write_rows(archive_db, [room_row("dev", f"m{i}") for i in range(50)])
    async with archive_db.acquire() as conn:
        await conn.execute("ANALYZE messages")
        await conn.execute("SET enable_seqscan = off")
        plan = await explain(
            conn,
            "SELECT id FROM messages WHERE room = 'dev' AND id < '~' ORDER BY id DESC LIMIT 10",
        )
        assert "messages_room_id" in plan
        plan = await explain(
            conn,
            "SELECT id FROM messages WHERE dm_lo = 'a' AND dm_hi = 'b' AND id < '~'"
            " ORDER BY id DESC LIMIT 10",
        )
        assert "messages_dm_id" in plan


# --- writing ----------------------------------------------------------------------------


async def test_writing_a_batch_twice_adds_no_row(archive_db: asyncpg.Pool) -> None:
    rows = [room_row("dev", f"m{i}") for i in range(100)]
    assert await write_rows(archive_db, rows) == 100
    # A redelivered batch, partly overlapping with new tasks, and a task duplicated inside
    # one batch: only the genuinely new rows are written.
    extra = [room_row("dev", "new-1"), room_row("dev", "new-2")]
    assert await write_rows(archive_db, [*rows[:50], *extra, extra[0]]) == 2
    assert await archive_db.fetchval("SELECT count(*) FROM messages") == 102


async def test_a_stored_row_in_a_transaction_keeps_the_callers_work_and_writes_the_rest(
    archive_db: asyncpg.Pool,
) -> None:
    # The batch is COPYed first; a stored row makes the COPY fail on the primary key, and
    # the rows go in again with ON CONFLICT. Inside the caller's transaction (user state is
    # written with the messages) that failure must not undo what the caller wrote before.
    stored = room_row("dev", "stored")
    await write_rows(archive_db, [stored])
    fresh = [room_row("dev", f"fresh-{i}") for i in range(3)]
    async with archive_db.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO rooms (name, created_at_ms) VALUES ('dev', 1)")
        assert await handlers.write_rows_pending(conn, [*fresh, stored]) == (3, [])
    assert await archive_db.fetchval("SELECT count(*) FROM messages") == 4
    assert await archive_db.fetchval("SELECT count(*) FROM rooms") == 1


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.ARCHIVE.archive-writer.1.17.17.1700000000123456789.0",
        "$JS.ACK.ARCHIVE.archive-writer.3.5.9.1700000000123456789.42",
        # The newer form (domain, account hash, random token) goes to nats-py.
        "$JS.ACK.hub.ACCHASH.ARCHIVE.archive-writer.2.5.9.1700000000123456789.42.tok",
        "$JS.ACK._.ACCHASH.ARCHIVE.archive-writer.4.5.9.1700000000123456789.0",
    ],
)
def test_the_delivery_count_is_read_as_nats_py_reads_it(reply: str) -> None:
    msg = Msg(_client=None, subject="archive.tasks", reply=reply)  # type: ignore[arg-type]
    assert times_delivered(msg) == Msg.Metadata._from_reply(reply).num_delivered


async def test_a_dm_is_stored_once_under_its_sorted_pair(archive_db: asyncpg.Pool) -> None:
    await write_rows(archive_db, [dm_row("zoe", "adam", "hi")])
    record = await archive_db.fetchrow("SELECT room, dm_lo, dm_hi, sender FROM messages")
    assert dict(record) == {"room": None, "dm_lo": "adam", "dm_hi": "zoe", "sender": "zoe"}


# --- decoding tasks ---------------------------------------------------------------------


def test_both_task_kinds_decode_to_the_same_row() -> None:
    message = pb.ChatMessage(id=ids.new_id(), room="dev", sender="bob", content="x", ts_ms=5)
    data, headers = codec.encode(message)
    sourced = {**headers, "Nats-Stream-Source": f"{names.STREAM_CHAT} 42 > >"}
    from_chat = task_row(names.room_subject("dev"), data, sourced)
    data, headers = codec.encode(pb.ArchiveTask(message=message))
    direct = task_row(names.ARCHIVE_TASKS, data, headers)
    assert from_chat.stream_seq == 42 and direct.stream_seq is None
    assert from_chat == direct._replace(stream_seq=42)


@pytest.mark.parametrize(
    ("payload", "headers", "reason"),
    [
        (b"\x0a\x10abc", {names.HEADER_TYPE: "chat.v1.ArchiveTask"}, "truncated"),
        (b"x", {names.HEADER_TYPE: "chat.v1.NoSuchThing"}, "unknown payload type"),
        (bytes(pb.ArchiveTask()), {names.HEADER_TYPE: "chat.v1.ArchiveTask"}, "without a message"),
        (
            bytes(pb.ChatMessage(id="short", room="dev", sender="bob")),
            {names.HEADER_TYPE: "chat.v1.ChatMessage"},
            "bad message id",
        ),
        (
            bytes(pb.ChatMessage(id=ids.new_id(), sender="bob", content="no target")),
            {names.HEADER_TYPE: "chat.v1.ChatMessage"},
            "exactly one of room and dm_peer",
        ),
        (
            bytes(pb.ChatMessage(id=ids.new_id(), room="dev", sender="bob", content="a\x00b")),
            {names.HEADER_TYPE: "chat.v1.ChatMessage"},
            "NUL",
        ),
    ],
)
def test_undecodable_or_invalid_tasks_are_poison_with_a_reason(
    payload: bytes, headers: dict[str, str], reason: str
) -> None:
    with pytest.raises(PoisonTask, match=reason):
        task_row(names.ARCHIVE_TASKS, payload, headers)


# --- history ----------------------------------------------------------------------------


async def test_room_pages_walk_back_through_equal_timestamps_without_gaps_or_repeats(
    archive_db: asyncpg.Pool,
) -> None:
    # 23 messages sharing one millisecond (ids still sort in creation order), plus noise
    # in another room.
    rows = [room_row("dev", f"m{i}") for i in range(23)]
    await write_rows(archive_db, [*rows, room_row("other", "noise")])
    expected = [r.id for r in rows]

    seen: list[str] = []
    before = ""
    pages = 0
    while True:
        request = pb.HistoryRequest(room="dev", requester="bob", before_id=before, limit=5)
        page = pb.HistoryPage.parse(await room_history(archive_db, request, page_max=200))
        ids_in_page = [m.id for m in page.messages]
        assert ids_in_page == sorted(ids_in_page)  # oldest first within a page
        seen = ids_in_page + seen
        pages += 1
        if not page.has_more:
            break
        before = ids_in_page[0]
    assert seen == expected
    assert pages == 5  # 5 + 5 + 5 + 5 + 3


async def test_latest_page_is_the_newest_messages_and_page_size_is_capped(
    archive_db: asyncpg.Pool,
) -> None:
    rows = [room_row("dev", f"m{i}", ts_ms=SAME_MS + i) for i in range(30)]
    await write_rows(archive_db, rows)
    request = pb.HistoryRequest(room="dev", limit=1000)
    page = pb.HistoryPage.parse(await room_history(archive_db, request, page_max=10))
    assert [m.id for m in page.messages] == [r.id for r in rows[-10:]]
    assert page.has_more
    first = page.messages[0]
    assert (first.room, first.sender, first.content, first.ts_ms) == (
        "dev",
        "alice",
        "m20",
        SAME_MS + 20,
    )


async def test_dm_thread_is_served_to_both_participants(archive_db: asyncpg.Pool) -> None:
    thread = [dm_row("alice", "bob", "hi bob"), dm_row("bob", "alice", "hi alice")]
    await write_rows(archive_db, [*thread, dm_row("alice", "carol", "other thread")])
    for requester, peer in (("alice", "bob"), ("bob", "alice")):
        request = pb.HistoryRequest(dm_peer=peer, requester=requester)
        page = pb.HistoryPage.parse(await dm_history(archive_db, request, 50))
        assert [(m.sender, m.dm_peer, m.content) for m in page.messages] == [
            ("alice", "bob", "hi bob"),
            ("bob", "alice", "hi alice"),
        ]
        assert not page.has_more


async def test_dm_thread_is_refused_to_a_third_user(archive_db: asyncpg.Pool) -> None:
    thread = [dm_row("alice", "bob", f"secret {i}") for i in range(3)]
    await write_rows(archive_db, thread)
    # Carol can only ever ask for her own thread with bob, which holds nothing of theirs...
    request = pb.HistoryRequest(dm_peer="bob", requester="carol")
    page = pb.HistoryPage.parse(await dm_history(archive_db, request, 50))
    assert page.messages == []
    # ...and paging from one of their message ids is refused outright.
    request = pb.HistoryRequest(dm_peer="bob", requester="carol", before_id=thread[-1].id)
    with pytest.raises(ServiceError) as refused:
        await dm_history(archive_db, request, 50)
    assert refused.value.code == "403"


@pytest.mark.parametrize(
    "request_",
    [
        pb.HistoryRequest(room="Not A Room"),
        pb.HistoryRequest(room="dev", dm_peer="bob"),
        pb.HistoryRequest(room="dev", before_id="not-an-id"),
    ],
)
async def test_bad_room_requests_are_400(
    archive_db: asyncpg.Pool, request_: pb.HistoryRequest
) -> None:
    with pytest.raises(ServiceError) as bad:
        await room_history(archive_db, request_, 50)
    assert bad.value.code == "400"


@pytest.mark.parametrize(
    "request_",
    [
        pb.HistoryRequest(dm_peer="bob"),  # no requester: the gateway must pass one
        pb.HistoryRequest(dm_peer="bob!", requester="alice"),
        pb.HistoryRequest(dm_peer="bob", requester="alice", room="dev"),
    ],
)
async def test_bad_dm_requests_are_400(
    archive_db: asyncpg.Pool, request_: pb.HistoryRequest
) -> None:
    with pytest.raises(ServiceError) as bad:
        await dm_history(archive_db, request_, 50)
    assert bad.value.code == "400"
