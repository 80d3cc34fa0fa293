"""User state in Postgres (issue #13): applying membership and read events, the
watermark, and the queries behind the chat-userstate service. Plain async functions; no
NATS here (the unapplied tail of events is read by the caller and passed in).

Exactness of unread counts: a count is "messages of the thread with CHAT sequence in
(read marker, upto], not sent by the user". The archive answers for sequences up to its
watermark W (every CHAT sequence <= W is stored, or was dead-lettered and never will
be); the asker adds the CHAT messages in (W, upto] it reads from the stream itself. So
the count is exact whatever the archive's lag, and never counts a message twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from chatlib import mentions, names, validate
from chatlib.proto.chat import v1 as pb
from chatlib.userstate_wire import State, Thread

from archive.handlers import PoisonTask, Row, bad_request, write_rows_pending

# Counts stop at this many: "99+" (the cap itself means "cap or more").
DEFAULT_CAP = 100
MAX_CAP = 1000
# Rows examined per watermark step; the rest is left for the next call.
WATERMARK_STEP = 5000
ROOMS_PAGE_MAX = 200
THREADS_PAGE_MAX = 200
ROOMS_PAGE_DEFAULT = 50
Db = asyncpg.Connection | PoolConnectionProxy


def room_thread(room: str) -> str:
    return f"r:{room}"


def dm_thread(peer: str) -> str:
    return f"d:{peer}"


# --- Events -> Postgres ------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    seq: int  # USERSTATE stream sequence
    event: pb.MembershipEvent | pb.ReadEvent


def check_event(subject: str, event: object) -> pb.MembershipEvent | pb.ReadEvent:
    """The event if it is one we apply and its fields are valid; PoisonTask otherwise."""
    parsed = names.parse_user_subject(subject)
    if parsed is None:
        raise PoisonTask(f"not a user-state subject: {subject}")
    user, kind = parsed
    if isinstance(event, pb.MembershipEvent) and kind == "membership":
        if not validate.is_valid_name(event.room):
            raise PoisonTask(f"bad room {event.room!r}")
    elif isinstance(event, pb.ReadEvent) and kind == "read":
        if bool(event.room) == bool(event.dm_peer):
            raise PoisonTask("exactly one of room and dm_peer must be set")
        if not validate.is_valid_name(event.room or event.dm_peer):
            raise PoisonTask("bad thread name")
        if event.seq <= 0:
            raise PoisonTask("a read marker needs a sequence")
    else:
        raise PoisonTask(f"unexpected {type(event).__name__} on {subject}")
    # The subject is what NATS permissions protect: an event about someone else is forged.
    if event.user != user or not event.id:
        raise PoisonTask(f"event user {event.user!r} does not match the subject {subject}")
    return event


UPSERT_MEMBERSHIP = """
INSERT INTO memberships ("user", room, member, joined_at_ms, event_seq, event_id)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT ("user", room) DO UPDATE SET
    member = EXCLUDED.member,
    joined_at_ms = CASE WHEN EXCLUDED.member AND NOT memberships.member
                        THEN EXCLUDED.joined_at_ms ELSE memberships.joined_at_ms END,
    event_seq = EXCLUDED.event_seq,
    event_id = EXCLUDED.event_id
WHERE memberships.event_seq < EXCLUDED.event_seq
"""
INSERT_ROOM = "INSERT INTO rooms (name, created_at_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING"
UPSERT_MARKER = """
INSERT INTO read_markers ("user", thread, seq, event_id, updated_ms) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT ("user", thread) DO UPDATE SET
    seq = EXCLUDED.seq, event_id = EXCLUDED.event_id, updated_ms = EXCLUDED.updated_ms
WHERE read_markers.seq < EXCLUDED.seq
"""


async def apply_events(db: asyncpg.Pool, events: Sequence[Event]) -> None:
    """Apply a batch in one transaction. Idempotent and order-proof: a membership row
    keeps the highest event sequence that wrote it, a marker the highest CHAT sequence."""
    if not events:
        return
    async with db.acquire() as conn, conn.transaction():
        for item in events:
            event = item.event
            if isinstance(event, pb.MembershipEvent):
                await conn.execute(
                    UPSERT_MEMBERSHIP,
                    event.user,
                    event.room,
                    event.joined,
                    event.ts_ms,
                    item.seq,
                    event.id,
                )
                if event.joined:
                    await conn.execute(INSERT_ROOM, event.room, event.ts_ms)
            else:
                thread = room_thread(event.room) if event.room else dm_thread(event.dm_peer)
                await conn.execute(
                    UPSERT_MARKER, event.user, thread, event.seq, event.id, event.ts_ms
                )


# --- Written with the messages -------------------------------------------------------------

DM_THREADS_UPSERT = """
INSERT INTO dm_threads ("user", peer, last_seq, last_ts_ms)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
ON CONFLICT ("user", peer) DO UPDATE SET
    last_seq = EXCLUDED.last_seq, last_ts_ms = EXCLUDED.last_ts_ms
WHERE dm_threads.last_seq < EXCLUDED.last_seq
"""
# Only members of the room are mentioned (others cannot read it anyway).
MENTIONS_INSERT = """
INSERT INTO mentions ("user", message_id, room, stream_seq)
SELECT u.name, u.id, u.room, u.seq
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS u(name, id, room, seq)
WHERE EXISTS (SELECT 1 FROM memberships m
              WHERE m."user" = u.name AND m.room = u.room AND m.member)
ON CONFLICT DO NOTHING
"""
MENTIONED_MEMBERS = """
SELECT u.name, u.id FROM unnest($1::text[], $2::text[], $3::text[]) AS u(name, id, room)
WHERE EXISTS (SELECT 1 FROM memberships m
              WHERE m."user" = u.name AND m.room = u.room AND m.member)
"""


@dataclass
class Extras:
    """What a batch of messages adds to user state besides the message rows."""

    dm: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    mentions: list[tuple[str, Row]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.dm or self.mentions)


def extras_of(rows: Iterable[Row]) -> Extras:
    extras = Extras()
    for row in rows:
        seq = row.stream_seq
        if seq is None:
            continue  # not from the CHAT log: it takes no part in counts
        if row.dm_lo is not None and row.dm_hi is not None:
            for user, peer in ((row.dm_lo, row.dm_hi), (row.dm_hi, row.dm_lo)):
                # One upsert per thread per batch (a statement may not touch a row twice).
                known = extras.dm.get((user, peer))
                if known is None or known[0] < seq:
                    extras.dm[(user, peer)] = (seq, row.ts_ms)
        elif row.room is not None:
            for user in mentions.mentioned(row.content):
                if user != row.sender:
                    extras.mentions.append((user, row))
    return extras


class Written(NamedTuple):
    new: int  # rows not stored before
    mentioned: list[tuple[str, Row]]  # mentions of members
    pending: list[str]  # ids among the rows with lifecycle events waiting for them


async def write_messages(db: asyncpg.Pool, rows: Sequence[Row]) -> Written:
    """Insert the rows (handlers.write_rows_pending) and, in the same transaction, what
    they add to user state."""
    extras = extras_of(rows)
    if not extras:
        new, pending = await write_rows_pending(db, rows)
        return Written(new, [], pending)
    async with db.acquire() as conn, conn.transaction():
        new, pending = await write_rows_pending(conn, rows)
        return Written(new, await write_extras(conn, extras), pending)


async def write_extras(conn: Db, extras: Extras) -> list[tuple[str, Row]]:
    """Write the batch's DM threads and mentions (in the caller's transaction); returns
    the mentions of members, whether new or not (their events are deduplicated)."""
    if extras.dm:
        keys = list(extras.dm)
        await conn.execute(
            DM_THREADS_UPSERT,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [extras.dm[k][0] for k in keys],
            [extras.dm[k][1] for k in keys],
        )
    if not extras.mentions:
        return []
    found = extras.mentions
    await conn.execute(
        MENTIONS_INSERT,
        [u for u, _ in found],
        [r.id for _, r in found],
        [r.room for _, r in found],
        [r.stream_seq for _, r in found],
    )
    members = await conn.fetch(
        MENTIONED_MEMBERS,
        [u for u, _ in found],
        [r.id for _, r in found],
        [r.room for _, r in found],
    )
    wanted = {(m["name"], m["id"]) for m in members}
    return [(u, r) for u, r in found if (u, r.id) in wanted]


# --- The watermark -----------------------------------------------------------------------


async def record_skipped(db: asyncpg.Pool | asyncpg.Connection, seq: int) -> None:
    """A CHAT sequence that will never be stored (dead-lettered): the watermark passes it."""
    await db.execute(
        "INSERT INTO skipped_seqs (stream_seq) VALUES ($1) ON CONFLICT DO NOTHING", seq
    )


async def advance_watermark(db: asyncpg.Pool, floor: int = 0) -> int:
    """Move the watermark over every contiguous stored (or skipped) sequence after it;
    returns it. `floor`: sequences below it are gone from the CHAT log (never to come).

    Every CHAT sequence must end up either as a `messages` row with its stream_seq or in
    `skipped_seqs`: a CHAT entry that is not a message row (e.g. an edit or a reaction
    event stored elsewhere) must be recorded with record_skipped() when it is applied,
    or the watermark stops there (counts stay exact, but hello reads an ever longer
    tail from the CHAT log)."""
    current = int(await db.fetchval("SELECT seq FROM archive_watermark WHERE id = 1") or 0)
    start = max(current, floor)
    while True:
        seqs = await db.fetch(
            "(SELECT stream_seq FROM messages WHERE stream_seq > $1"
            "  ORDER BY stream_seq LIMIT $2)"
            " UNION (SELECT stream_seq FROM skipped_seqs WHERE stream_seq > $1"
            "  ORDER BY stream_seq LIMIT $2) ORDER BY 1 LIMIT $2",
            start,
            WATERMARK_STEP,
        )
        moved = start
        for record in seqs:
            if record[0] != moved + 1:
                break
            moved += 1
        gap = moved < start + len(seqs) or len(seqs) < WATERMARK_STEP
        start = moved
        if gap:
            break
    if start > current:
        await db.execute("UPDATE archive_watermark SET seq = GREATEST(seq, $1) WHERE id = 1", start)
    return start


# --- Queries -----------------------------------------------------------------------------


@dataclass
class Tail:
    """Events stored in USERSTATE but maybe not applied yet (the consumer's unacked
    part), to be laid over what Postgres says."""

    events: list[Event] = field(default_factory=list)


def overlay(
    rooms: dict[str, int],
    markers: dict[str, int],
    tail: Tail,
    left_rooms: dict[str, int] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Memberships (room -> event seq, member rooms only) and markers after the tail.
    `left_rooms`: rooms stored as left, with the sequence of the leave (an older join
    still unacked in the tail must not bring them back)."""
    member = dict(rooms)
    left: dict[str, int] = dict(left_rooms or {})
    marks = dict(markers)
    for item in sorted(tail.events, key=lambda e: e.seq):
        event = item.event
        if isinstance(event, pb.MembershipEvent):
            known = max(member.get(event.room, 0), left.get(event.room, 0))
            if item.seq <= known:
                continue
            if event.joined:
                member[event.room] = item.seq
                left.pop(event.room, None)
            else:
                member.pop(event.room, None)
                left[event.room] = item.seq
        else:
            key = room_thread(event.room) if event.room else dm_thread(event.dm_peer)
            marks[key] = max(marks.get(key, 0), event.seq)
    return member, marks


ROOM_COUNTS = """
SELECT t.room,
  (SELECT count(*) FROM (SELECT 1 FROM messages m
     WHERE m.room = t.room AND m.stream_seq > t.marker AND m.stream_seq <= $3
       AND m.sender <> $1 LIMIT $4) x) AS unread,
  (SELECT count(*) FROM (SELECT 1 FROM mentions n
     WHERE n."user" = $1 AND n.room = t.room AND n.stream_seq > t.marker
       AND n.stream_seq <= $3 LIMIT $4) y) AS mentions,
  last.stream_seq AS last_seq, last.ts_ms AS last_ts
FROM unnest($2::text[], $5::bigint[]) AS t(room, marker)
LEFT JOIN LATERAL (SELECT stream_seq, ts_ms FROM messages m
     WHERE m.room = t.room AND m.stream_seq IS NOT NULL
     ORDER BY m.stream_seq DESC LIMIT 1) last ON true
"""
DM_COUNTS = """
SELECT d.peer, d.last_seq, d.last_ts_ms, coalesce(k.marker, 0) AS marker,
  (SELECT count(*) FROM (SELECT 1 FROM messages m
     WHERE m.dm_lo = least($1 COLLATE "C", d.peer COLLATE "C")
       AND m.dm_hi = greatest($1 COLLATE "C", d.peer COLLATE "C")
       AND m.stream_seq > coalesce(k.marker, 0) AND m.stream_seq <= $2
       AND m.sender = d.peer LIMIT $3) x) AS unread
FROM dm_threads d
LEFT JOIN unnest($4::text[], $5::bigint[]) AS k(peer, marker) ON k.peer = d.peer
WHERE d."user" = $1 AND d.last_seq > coalesce(k.marker, 0)
ORDER BY d.last_seq DESC LIMIT $6
"""
# DM threads with unread messages listed in one state answer (the rest: `threads`).
STATE_DM_THREADS_MAX = 500


async def user_state(
    db: asyncpg.Pool, request: pb.UserStateRequest, watermark: int, tail: Tail
) -> State:
    """The user's rooms and counts; the service encodes it with chatlib.userstate_wire
    (a pb.UserState, byte for byte, without betterproto2's cost for 200 threads)."""
    user = request.user
    if not validate.is_valid_name(user):
        raise bad_request("user is missing or invalid")
    extra = [r for r in request.rooms if validate.is_valid_name(r)]
    cap = min(request.cap or DEFAULT_CAP, MAX_CAP)
    through = min(watermark, request.upto_seq) if request.upto_seq else watermark
    async with db.acquire() as conn:
        stored = await conn.fetch(
            'SELECT room, member, event_seq FROM memberships WHERE "user" = $1', user
        )
        marks = await conn.fetch('SELECT thread, seq FROM read_markers WHERE "user" = $1', user)
        known = bool(stored)
        rooms, markers = overlay(
            {r["room"]: r["event_seq"] for r in stored if r["member"]},
            {m["thread"]: m["seq"] for m in marks},
            tail,
            {r["room"]: r["event_seq"] for r in stored if not r["member"]},
        )
        wanted = sorted({*rooms, *extra})
        threads: list[Thread] = []
        for r in await conn.fetch(
            ROOM_COUNTS,
            user,
            wanted,
            through,
            cap,
            [markers.get(room_thread(room), 0) for room in wanted],
        ):
            threads.append(
                Thread(
                    room=r["room"],
                    unread=r["unread"],
                    mentions=r["mentions"],
                    read_seq=markers.get(room_thread(r["room"]), 0),
                    last_seq=r["last_seq"] or 0,
                    last_ts_ms=r["last_ts"] or 0,
                )
            )
        dm_marks = {k[2:]: v for k, v in markers.items() if k.startswith("d:")}
        peers = sorted(dm_marks)
        for d in await conn.fetch(
            DM_COUNTS,
            user,
            through,
            cap,
            peers,
            [dm_marks[p] for p in peers],
            STATE_DM_THREADS_MAX,
        ):
            threads.append(
                Thread(
                    dm_peer=d["peer"],
                    unread=d["unread"],
                    read_seq=d["marker"],
                    last_seq=d["last_seq"],
                    last_ts_ms=d["last_ts_ms"],
                )
            )
        # A DM read past the watermark, in a thread with nothing unread stored: the
        # gateway counts the unarchived tail against this marker, so it must know it.
        listed = {t.dm_peer for t in threads if t.dm_peer}
        for peer in peers:
            if peer not in listed and dm_marks[peer] > through:
                threads.append(Thread(dm_peer=peer, read_seq=dm_marks[peer]))
        threads = await _with_read_ids(conn, threads, tail)
    return State(
        rooms=sorted(rooms),
        threads=threads,
        archived_through=through,
        first_use=not known and not tail.events,
    )


async def _with_read_ids(conn: Db, threads: list[Thread], tail: Tail) -> list[Thread]:
    """The id of the message at each marker (from the tail's events, else the archive)."""
    from_tail = {
        e.event.seq: e.event.message_id
        for e in tail.events
        if isinstance(e.event, pb.ReadEvent) and e.event.message_id
    }
    wanted = [t.read_seq for t in threads if t.read_seq and t.read_seq not in from_tail]
    found = dict(from_tail)
    if wanted:
        for r in await conn.fetch(
            "SELECT stream_seq, id FROM messages WHERE stream_seq = ANY($1::bigint[])", wanted
        ):
            found[r["stream_seq"]] = r["id"]
    return [t._replace(read_id=found[t.read_seq]) if t.read_seq in found else t for t in threads]


async def room_directory(db: asyncpg.Pool, request: pb.RoomsRequest) -> pb.RoomsPage:
    prefix, after = request.prefix, request.after
    if prefix and not all(c in "abcdefghijklmnopqrstuvwxyz0123456789_-" for c in prefix):
        raise bad_request(f"bad prefix {prefix!r}")
    if after and not validate.is_valid_name(after):
        raise bad_request(f"bad room {after!r}")
    limit = min(request.limit or ROOMS_PAGE_DEFAULT, ROOMS_PAGE_MAX)
    # Names are [a-z0-9_-] and COLLATE "C": the prefix range is [prefix, prefix || '~').
    records = await db.fetch(
        """
        SELECT r.name,
          (SELECT count(*) FROM memberships m WHERE m.room = r.name AND m.member) AS members,
          (SELECT ts_ms FROM messages m WHERE m.room = r.name AND m.stream_seq IS NOT NULL
             ORDER BY m.stream_seq DESC LIMIT 1) AS last_ts
        FROM rooms r
        WHERE r.name >= $1 AND r.name < $1 || '~' AND r.name > $2
        ORDER BY r.name LIMIT $3
        """,
        prefix,
        after,
        limit + 1,
    )
    return pb.RoomsPage(
        rooms=[
            pb.RoomInfo(name=r["name"], members=r["members"], last_ts_ms=r["last_ts"] or 0)
            for r in records[:limit]
        ],
        has_more=len(records) > limit,
    )


async def dm_threads(db: asyncpg.Pool, request: pb.ThreadsRequest) -> pb.ThreadsPage:
    if not validate.is_valid_name(request.user):
        raise bad_request("user is missing or invalid")
    limit = min(request.limit or ROOMS_PAGE_DEFAULT, THREADS_PAGE_MAX)
    records = await db.fetch(
        """
        SELECT d.peer, d.last_seq, d.last_ts_ms, coalesce(r.seq, 0) AS marker
        FROM dm_threads d
        LEFT JOIN read_markers r ON r."user" = d."user" AND r.thread = 'd:' || d.peer
        WHERE d."user" = $1 AND d.last_seq < $2
        ORDER BY d.last_seq DESC LIMIT $3
        """,
        request.user,
        request.before_seq or 2**62,
        limit + 1,
    )
    return pb.ThreadsPage(
        threads=[
            pb.ThreadState(
                dm_peer=r["peer"],
                read_seq=r["marker"],
                last_seq=r["last_seq"],
                last_ts_ms=r["last_ts_ms"],
            )
            for r in records[:limit]
        ],
        has_more=len(records) > limit,
    )
