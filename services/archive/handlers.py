"""The archive's logic as plain async functions: turn a task into a row, write a batch of
rows idempotently, answer history requests. No NATS here; Postgres is passed in."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import NamedTuple

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from chatlib import codec, ids, names, validate, wire
from chatlib.proto.chat import v1 as pb
from nats.micro.request import ServiceError

DEFAULT_PAGE = 50

# Errors that say "the database is not reachable right now", not "this row is bad":
# retrying the same work later will succeed, so the work must not be dead-lettered.
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,  # includes ConnectionDoesNotExistError
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
)


class PoisonTask(Exception):
    """A task that can never be written, whatever the retries: dead-letter it at once."""


class Row(NamedTuple):
    """A messages row, its fields in MESSAGE_COLUMNS order (a batch is COPYed as is). A
    tuple rather than a frozen dataclass: a third of the cost to make, tens of thousands
    of times a second."""

    id: str
    room: str | None
    dm_lo: str | None
    dm_hi: str | None
    sender: str
    content: str
    ts_ms: int
    stream_seq: int | None
    reply_to: str | None = None


def one_line(text: str, limit: int = 500) -> str:
    """For header values (dead-letter reasons, service errors): no line breaks, bounded."""
    return " ".join(text.split())[:limit]


# --- Tasks -> rows ----------------------------------------------------------------------


def decode_task(subject: str, data: bytes, headers: dict[str, str] | None) -> pb.ChatMessage:
    """The chat message a task carries: a ChatMessage sourced from CHAT, or an ArchiveTask
    published on archive.tasks. The Chat-Type header decides; without it, the subject."""
    try:
        if (headers or {}).get(names.HEADER_TYPE):
            decoded = codec.decode(data, headers)
        elif subject == names.ARCHIVE_TASKS:
            decoded = codec.decode_as(pb.ArchiveTask, data)
        else:
            decoded = codec.decode_as(pb.ChatMessage, data)
    except codec.DecodeError as exc:
        raise PoisonTask(str(exc)) from exc
    if isinstance(decoded, pb.ArchiveTask):
        if decoded.message is None:
            raise PoisonTask("archive task without a message")
        return decoded.message
    if isinstance(decoded, pb.ChatMessage):
        return decoded
    raise PoisonTask(f"unexpected payload type {codec.type_name(decoded)}")


def chat_sequence(headers: dict[str, str] | None) -> int | None:
    """The CHAT stream sequence of a sourced message, from JetStream's Nats-Stream-Source
    header ("CHAT <seq> <filter> <transform>"); None for tasks published directly."""
    source = (headers or {}).get("Nats-Stream-Source", "")
    parts = source.split()
    if len(parts) >= 2 and parts[0].split(":")[0] == names.STREAM_CHAT and parts[1].isdigit():
        return int(parts[1])
    return None


# chatlib.ids.is_valid_id as one regex: same alphabet (Crockford base32), same length, but
# C speed, which matters at tens of thousands of tasks per second.
_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def message_row(message: pb.ChatMessage | wire.Fields, stream_seq: int | None = None) -> Row:
    """The row for a message, or PoisonTask when no valid row can be made of it."""
    if not _ID.fullmatch(message.id):
        raise PoisonTask(f"bad message id {message.id!r}")
    if not validate.is_valid_name(message.sender):
        raise PoisonTask(f"bad sender {message.sender!r}")
    if bool(message.room) == bool(message.dm_peer):
        raise PoisonTask("exactly one of room and dm_peer must be set")
    if message.room and not validate.is_valid_name(message.room):
        raise PoisonTask(f"bad room {message.room!r}")
    if message.dm_peer and not validate.is_valid_name(message.dm_peer):
        raise PoisonTask(f"bad dm_peer {message.dm_peer!r}")
    if "\x00" in message.content:
        raise PoisonTask("content contains NUL, which Postgres text cannot store")
    if message.ts_ms < 0:
        raise PoisonTask(f"negative timestamp {message.ts_ms}")
    dm_lo, dm_hi = (
        names.dm_pair(message.sender, message.dm_peer) if message.dm_peer else (None, None)
    )
    return Row(
        id=message.id,
        room=message.room or None,
        dm_lo=dm_lo,
        dm_hi=dm_hi,
        sender=message.sender,
        content=message.content,
        ts_ms=message.ts_ms,
        stream_seq=stream_seq,
        reply_to=message.reply_to if ids.is_valid_id(message.reply_to) else None,
    )


_ARCHIVE_TASK = codec.type_name(pb.ArchiveTask())
_CHAT_MESSAGE = codec.type_name(pb.ChatMessage())


def task_row(subject: str, data: bytes, headers: dict[str, str] | None) -> Row:
    # Fast path first (chatlib.wire): it reads the canonical encoding every publisher
    # writes and says None for anything else, which the codec then judges.
    declared = headers.get(names.HEADER_TYPE) if headers else None
    kind = declared or (_ARCHIVE_TASK if subject == names.ARCHIVE_TASKS else _CHAT_MESSAGE)
    fields = None
    if kind == _ARCHIVE_TASK:
        fields = wire.parse_archive_task(data)
    elif kind == _CHAT_MESSAGE:
        fields = wire.parse_chat_message(data)
    message = decode_task(subject, data, headers) if fields is None else fields
    return message_row(message, chat_sequence(headers))


# --- Writing ----------------------------------------------------------------------------

MESSAGE_COLUMNS = Row._fields  # the table's columns, as COPY is given them

# A batch goes in with COPY first: Postgres's bulk path, about half the server time of an
# INSERT of the same rows and a quarter of the client's (docs/performance.md). COPY knows no
# ON CONFLICT, so a batch holding a row already stored (a redelivery after a crash, a
# duplicate publish past JetStream's window, another replica's commit of the same task) fails
# whole on the primary key, writes nothing, and is written again with this statement, whose
# ON CONFLICT DO NOTHING skips what is stored. Either way each id is stored once, which is
# what lets us ack after the commit and still be exact.
INSERT_ROWS = """
INSERT INTO messages (id, room, dm_lo, dm_hi, sender, content, ts_ms, stream_seq, reply_to)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::bigint[], $8::bigint[], $9::text[])
ON CONFLICT (id) DO NOTHING
"""
# The batch's messages that have lifecycle events waiting for them (an edit can arrive
# before its message: archive.lifecycle). It looks at the whole batch, not only the new
# rows, so a crash between this commit and applying them is repaired by the redelivery.
PENDING_EVENTS = """
SELECT DISTINCT message_id FROM message_events WHERE NOT applied AND message_id = ANY($1::text[])
"""


async def write_rows(
    db: asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy, rows: Sequence[Row]
) -> int:
    """Insert the rows not yet stored, atomically; returns how many were new."""
    return (await write_rows_pending(db, rows))[0]


async def write_rows_pending(
    db: asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy, rows: Sequence[Row]
) -> tuple[int, list[str]]:
    """write_rows, and the ids among the rows that have lifecycle events waiting. On a
    connection inside a transaction, the rows are part of that transaction."""
    if not rows:
        return 0, []
    # In id order: two replicas writing overlapping batches (a redelivery) then take the
    # primary key's locks in the same order, so they wait for each other, never deadlock.
    unique = sorted({row.id: row for row in rows}.values(), key=lambda row: row.id)
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await _write_unique(conn, unique)
    return await _write_unique(db, unique)


async def _write_unique(
    conn: asyncpg.Connection | PoolConnectionProxy, unique: list[Row]
) -> tuple[int, list[str]]:
    try:
        # A transaction of its own, or a savepoint in the caller's: a refused COPY must
        # leave nothing behind, and the caller's work before it must survive.
        async with conn.transaction():
            await conn.copy_records_to_table("messages", records=unique, columns=MESSAGE_COLUMNS)
        new = len(unique)
    except asyncpg.UniqueViolationError:
        status = await conn.execute(
            INSERT_ROWS, *(list(column) for column in zip(*unique, strict=True))
        )
        new = int(status.split()[-1])  # "INSERT 0 <rows>"
    pending = await conn.fetch(PENDING_EVENTS, [r.id for r in unique])
    return new, [p["message_id"] for p in pending]


# --- History ----------------------------------------------------------------------------

# The last four: edits, deletes, reactions and replies (archive.lifecycle.page_states).
COLUMNS = (
    "id, room, dm_lo, dm_hi, sender, content, ts_ms, reply_to, edited_at_ms, deleted, has_reactions"
)
# Sorts after every message id (ids are [0-9A-Z] and the column collates bytewise), so
# "id < AFTER_EVERY_ID" is the latest page and one query shape serves both kinds of page.
AFTER_EVERY_ID = "~"


def bad_request(description: str) -> ServiceError:
    return ServiceError("400", description)


def page_limit(requested: int, page_max: int) -> int:
    """0 means "the default"; anything above the cap is served as the cap."""
    return min(requested or DEFAULT_PAGE, page_max)


def check_before_id(before_id: str) -> None:
    if before_id and not ids.is_valid_id(before_id):
        raise bad_request(f"before_id {before_id!r} is not a message id")


def record_message(record: asyncpg.Record) -> bytes:
    """The encoded pb.ChatMessage of a row (chatlib.wire: betterproto2 would cost ~50 us)."""
    room, sender = record["room"], record["sender"]
    if room is not None:
        peer = ""
    else:
        # dm_peer is the recipient, as on the wire: the participant who is not the sender.
        peer = record["dm_hi"] if sender == record["dm_lo"] else record["dm_lo"]
    return wire.encode_message(
        record["id"], room or "", peer, sender, record["content"], record["ts_ms"]
    )


async def to_page(db: asyncpg.Pool, records: list[asyncpg.Record], limit: int) -> bytes:
    """Records newest first, one more than `limit` when older ones exist -> the encoded
    pb.HistoryPage, oldest first, with the states of edited, deleted, reacted-to and
    replying messages."""
    return await encode_page(db, records[:limit], len(records) > limit)


async def encode_page(
    db: asyncpg.Pool, newest_first: list[asyncpg.Record], has_more: bool
) -> bytes:
    from archive.lifecycle import page_states  # it imports this module

    states = await page_states(db, newest_first)
    return wire.encode_page([record_message(r) for r in reversed(newest_first)], has_more, states)


async def room_history(db: asyncpg.Pool, request: pb.HistoryRequest, page_max: int) -> bytes:
    """The latest page of a room, or the page just before `before_id`, as an encoded
    pb.HistoryPage (the service sends it as is)."""
    if request.dm_peer:
        raise bad_request("a room request must not set dm_peer")
    if not validate.is_valid_name(request.room):
        raise bad_request(f"bad room {request.room!r}: {validate.NAME_RULE}")
    check_before_id(request.before_id)
    limit = page_limit(request.limit, page_max)
    special = await _around_or_thread(db, "room = $1", [request.room], request, limit)
    if special is not None:
        return special
    # Paging by id, not ts_ms: ids are unique and sort by time, so messages sharing a
    # millisecond are neither skipped nor repeated across pages.
    records = await db.fetch(
        f"SELECT {COLUMNS} FROM messages WHERE room = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        request.room,
        request.before_id or AFTER_EVERY_ID,
        limit + 1,
    )
    return await to_page(db, records, limit)


async def dm_history(db: asyncpg.Pool, request: pb.HistoryRequest, page_max: int) -> bytes:
    """The DM thread between the requester (from the gateway's token) and dm_peer.

    The thread is always the requester's own, so nobody can name someone else's; a
    before_id taken from a thread the requester is not in is refused (403) rather than
    answered, so message ids of other people's DMs reveal nothing."""
    if request.room:
        raise bad_request("a DM request must not set room")
    if not validate.is_valid_name(request.requester):
        raise bad_request("requester (the authenticated user) is missing or invalid")
    if not validate.is_valid_name(request.dm_peer):
        raise bad_request(f"bad dm_peer {request.dm_peer!r}: {validate.NAME_RULE}")
    check_before_id(request.before_id)
    lo, hi = names.dm_pair(request.requester, request.dm_peer)
    if request.before_id:
        anchor = await db.fetchrow(
            "SELECT room, dm_lo, dm_hi FROM messages WHERE id = $1", request.before_id
        )
        if anchor is not None and (anchor["dm_lo"], anchor["dm_hi"]) != (lo, hi):
            raise ServiceError("403", "before_id is not a message of this thread")
    limit = page_limit(request.limit, page_max)
    special = await _around_or_thread(db, "dm_lo = $1 AND dm_hi = $2", [lo, hi], request, limit)
    if special is not None:
        return special
    records = await db.fetch(
        f"SELECT {COLUMNS} FROM messages WHERE dm_lo = $1 AND dm_hi = $2"
        " AND id < $3 ORDER BY id DESC LIMIT $4",
        lo,
        hi,
        request.before_id or AFTER_EVERY_ID,
        limit + 1,
    )
    return await to_page(db, records, limit)


async def _around_or_thread(
    db: asyncpg.Pool, where: str, params: list[str], request: pb.HistoryRequest, limit: int
) -> bytes | None:
    """The page around a message, or a reply thread (issue 14); None for a plain page.
    `where` restricts to the conversation asked for, so an id from another one gives
    nothing of it."""
    for value in (request.around_id, request.thread_id):
        if value and not ids.is_valid_id(value):
            raise bad_request(f"{value!r} is not a message id")
    n = len(params)
    if request.thread_id:
        records = await db.fetch(
            f"SELECT {COLUMNS} FROM messages WHERE {where}"
            f" AND (id = ${n + 1} OR reply_to = ${n + 1}) ORDER BY id DESC LIMIT ${n + 2}",
            *params,
            request.thread_id,
            limit + 1,
        )
        return await to_page(db, list(records), limit)
    if not request.around_id:
        return None
    newer_count = limit // 2
    older = await db.fetch(
        f"SELECT {COLUMNS} FROM messages WHERE {where} AND id <= ${n + 1}"
        f" ORDER BY id DESC LIMIT ${n + 2}",
        *params,
        request.around_id,
        limit - newer_count + 1,
    )
    newer = await db.fetch(
        f"SELECT {COLUMNS} FROM messages WHERE {where} AND id > ${n + 1}"
        f" ORDER BY id LIMIT ${n + 2}",
        *params,
        request.around_id,
        newer_count,
    )
    kept_older = list(older[: limit - newer_count])
    newest_first = [*reversed(newer), *kept_older]
    return await encode_page(db, newest_first, len(older) > len(kept_older))
