"""Edits, deletes and reactions in the archive (issue 14), and the queries they add:
the message lookup behind the gateway's authorship check, and full-text search.

Applying is order-free on purpose. Archive replicas share the work queue, redeliveries
come back late, and an event can even arrive before its message: so every event is first
recorded (its id is the key: a redelivery adds nothing), then applied to its message, once
the message is there, by its CHAT stream sequence:

- an edit replaces the content when its sequence is above the message's version_seq;
- a delete always wins: content '' (a tombstone), edits' texts erased, reactions dropped;
- a reaction keeps, per (message, user, emoji), the state of the highest sequence.

Any order of the same events gives the same rows. The archive checks authority again
(the gateway did before publishing): an edit by anyone but the author, a delete by
neither the author nor an operator, an event naming another conversation than its
message's, an edit outside the edit window, are recorded as refused and change nothing.

Privacy: after a delete the archive also removes the message and its edits from the CHAT
stream (JetStream MSG.DELETE by sequence), so reconnect replay cannot serve them; the
gateway's replay additionally skips content deleted within the replayed range
(chatlib.message_events.honour_deletes) for the moment before the archive has done so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import nats.js.errors
from chatlib import codec, ids, message_events, names, validate, wire
from chatlib.proto.chat import v1 as pb
from nats.js import JetStreamContext
from nats.micro.request import ServiceError

from archive.handlers import PoisonTask, chat_sequence

log = logging.getLogger(__name__)

_LIFECYCLE_NAMES = {codec.type_name(cls()) for cls in message_events.LIFECYCLE_TYPES}


@dataclass(frozen=True)
class EventRow:
    id: str
    message_id: str
    kind: str
    room: str | None
    dm_lo: str | None
    dm_hi: str | None
    actor: str
    operator: bool
    content: str | None
    emoji: str | None
    removed: bool
    ts_ms: int
    stream_seq: int


def is_lifecycle(headers: dict[str, str] | None) -> bool:
    return bool(headers) and (headers or {}).get(names.HEADER_TYPE) in _LIFECYCLE_NAMES


def event_row(data: bytes, headers: dict[str, str] | None) -> EventRow:
    """The row of a lifecycle event sourced from CHAT; PoisonTask when none can be made."""
    try:
        event = message_events.decode_chat(data, headers)
    except codec.DecodeError as exc:
        raise PoisonTask(str(exc)) from exc
    if isinstance(event, pb.ChatMessage):
        raise PoisonTask("not a lifecycle event")
    seq = chat_sequence(headers)
    if seq is None:
        # Order comes from the CHAT sequence: an event that did not come through CHAT has
        # no place in it.
        raise PoisonTask("a lifecycle event must come from the CHAT stream")
    for value, what in ((event.id, "id"), (event.message_id, "message_id")):
        if not ids.is_valid_id(value):
            raise PoisonTask(f"bad {what} {value!r}")
    if not validate.is_valid_name(event.sender):
        raise PoisonTask(f"bad sender {event.sender!r}")
    if bool(event.room) == bool(event.dm_peer):
        raise PoisonTask("exactly one of room and dm_peer must be set")
    for name in (event.room, event.dm_peer):
        if name and not validate.is_valid_name(name):
            raise PoisonTask(f"bad room or peer {name!r}")
    dm_lo, dm_hi = names.dm_pair(event.sender, event.dm_peer) if event.dm_peer else (None, None)
    content = emoji = None
    operator = removed = False
    if isinstance(event, pb.MessageEdit):
        kind, content = "edit", event.content
        if "\x00" in content:
            raise PoisonTask("content contains NUL")
    elif isinstance(event, pb.MessageDelete):
        kind, operator = "delete", event.operator
    else:
        kind, emoji, removed = "react", event.emoji, event.removed
        if emoji not in message_events.EMOJI_SET:
            raise PoisonTask(f"emoji {emoji!r} is not one of the allowed reactions")
    return EventRow(
        id=event.id, message_id=event.message_id, kind=kind, room=event.room or None,
        dm_lo=dm_lo, dm_hi=dm_hi, actor=event.sender, operator=operator, content=content,
        emoji=emoji, removed=removed, ts_ms=event.ts_ms, stream_seq=seq,
    )  # fmt: skip


INSERT_EVENTS = """
INSERT INTO message_events (id, message_id, kind, room, dm_lo, dm_hi, actor, operator,
                            content, emoji, removed, ts_ms, stream_seq)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::bool[], $9::text[], $10::text[], $11::bool[],
                     $12::bigint[], $13::bigint[])
ON CONFLICT (id) DO NOTHING
"""


async def record(db: asyncpg.Pool | asyncpg.Connection, events: Sequence[EventRow]) -> None:
    """Store the events not yet stored (not applied yet: see apply_pending)."""
    if not events:
        return
    unique = list({e.id: e for e in events}.values())
    columns = (
        "id", "message_id", "kind", "room", "dm_lo", "dm_hi", "actor", "operator",
        "content", "emoji", "removed", "ts_ms", "stream_seq",
    )  # fmt: skip
    await db.execute(INSERT_EVENTS, *([getattr(e, c) for e in unique] for c in columns))
    # Their CHAT sequences will never be message rows: the user-state watermark (every
    # CHAT sequence stored or skipped, archive.userstate) passes them.
    await db.execute(
        "INSERT INTO skipped_seqs (stream_seq) SELECT unnest($1::bigint[]) ON CONFLICT DO NOTHING",
        [e.stream_seq for e in unique],
    )


async def apply_pending(
    pool: asyncpg.Pool, message_ids: Iterable[str], edit_window_ms: int
) -> list[int]:
    """Apply the recorded, not yet applied events of these messages (those whose message
    is stored). Returns the CHAT sequences to remove from the log (deleted content)."""
    purge: list[int] = []
    for message_id in sorted(set(message_ids)):
        async with pool.acquire() as conn, conn.transaction():
            purge.extend(await _apply_message(conn, message_id, edit_window_ms))
    return purge


async def sweep(pool: asyncpg.Pool, edit_window_ms: int, limit: int = 500) -> list[int]:
    """Apply events whose message has arrived meanwhile: two replicas writing an event and
    its message at the same moment can each miss the other's row."""
    rows = await pool.fetch(
        "SELECT DISTINCT e.message_id FROM message_events e JOIN messages m ON m.id = e.message_id"
        " WHERE NOT e.applied LIMIT $1",
        limit,
    )
    return await apply_pending(pool, [r["message_id"] for r in rows], edit_window_ms)


async def _apply_message(conn: Any, message_id: str, edit_window_ms: int) -> list[int]:
    # The row lock serializes replicas applying events of the same message.
    msg = await conn.fetchrow(
        "SELECT id, room, dm_lo, dm_hi, sender, ts_ms, version_seq, deleted, stream_seq"
        " FROM messages WHERE id = $1 FOR UPDATE",
        message_id,
    )
    if msg is None:
        return []
    pending = await conn.fetch(
        "SELECT * FROM message_events WHERE message_id = $1 AND NOT applied ORDER BY stream_seq",
        message_id,
    )
    if not pending and not msg["deleted"]:
        return []
    # With nothing pending on a deleted message (its delete redelivered after a crash
    # between the commit and the purge), the tombstone below is rewritten as it is and the
    # content's log sequences are returned again: removing them twice is harmless, never
    # removing them would leave the deleted text for replay to serve.
    deleted, version = msg["deleted"], msg["version_seq"]
    for event in pending:
        refused = _refusal(msg, event, edit_window_ms)
        if refused is None and event["kind"] == "delete":
            deleted = True
        elif refused is None and event["kind"] == "edit" and not deleted:
            if event["stream_seq"] > version:
                version = event["stream_seq"]
                await conn.execute(
                    "UPDATE messages SET content = $2, edited_at_ms = $3, version_seq = $4"
                    " WHERE id = $1",
                    message_id, event["content"], event["ts_ms"], version,
                )  # fmt: skip
        elif refused is None and event["kind"] == "react" and not deleted:
            await conn.execute(
                "INSERT INTO reactions (message_id, user_name, emoji, present, stream_seq)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (message_id, user_name, emoji) DO"
                " UPDATE SET present = EXCLUDED.present, stream_seq = EXCLUDED.stream_seq"
                " WHERE reactions.stream_seq < EXCLUDED.stream_seq",
                message_id, event["actor"], event["emoji"], not event["removed"],
                event["stream_seq"],
            )  # fmt: skip
            await conn.execute("UPDATE messages SET has_reactions = true WHERE id = $1", message_id)
        await conn.execute(
            "UPDATE message_events SET applied = true, refused = $2 WHERE id = $1",
            event["id"], refused,
        )  # fmt: skip
        if refused is not None:
            log.warning("refused lifecycle event", extra={"id": event["id"], "reason": refused})
    if not deleted:
        return []
    # A tombstone keeps its place (id, sender, time) and nothing of what was said.
    await conn.execute(
        "UPDATE messages SET deleted = true, content = '', has_reactions = false,"
        " edited_at_ms = NULL, version_seq = 0 WHERE id = $1",
        message_id,
    )
    await conn.execute("DELETE FROM reactions WHERE message_id = $1", message_id)
    edits = await conn.fetch(
        "UPDATE message_events SET content = NULL WHERE message_id = $1 AND kind = 'edit'"
        " RETURNING stream_seq",
        message_id,
    )
    seqs = [r["stream_seq"] for r in edits]
    if msg["stream_seq"] is not None:
        seqs.append(msg["stream_seq"])
    return seqs


def _refusal(msg: asyncpg.Record, event: asyncpg.Record, edit_window_ms: int) -> str | None:
    """Why the archive will not apply this event to this message (None: it will)."""
    if (event["room"], event["dm_lo"], event["dm_hi"]) != (msg["room"], msg["dm_lo"], msg["dm_hi"]):
        return "the event names another conversation than its message's"
    if event["kind"] == "edit":
        if event["actor"] != msg["sender"]:
            return "only the author edits"
        if event["ts_ms"] - msg["ts_ms"] > edit_window_ms:
            return "outside the edit window"
    elif event["kind"] == "delete":
        if event["actor"] != msg["sender"] and not event["operator"]:
            return "only the author or an operator deletes"
    elif msg["room"] is None and event["actor"] not in (msg["dm_lo"], msg["dm_hi"]):
        return "only a participant reacts in a DM"
    return None


class PurgeIncomplete(Exception):
    """Some deleted content could not be removed from the CHAT stream (NATS busy or
    restarting): the batch must not be acked, so its redelivery removes it then."""


async def purge_from_log(js: JetStreamContext, seqs: Iterable[int]) -> None:
    """Remove deleted content from the CHAT stream. Already gone (aged out, or removed by
    an earlier attempt) is fine; any other failure raises PurgeIncomplete once every
    sequence was tried (a redelivered delete names the same sequences again)."""
    failed: list[int] = []
    for seq in sorted(set(seqs)):
        try:
            await js.delete_msg(names.STREAM_CHAT, seq)
        except nats.js.errors.NotFoundError:
            continue
        except Exception as exc:
            log.warning("could not remove deleted content seq %d from the log: %s", seq, exc)
            failed.append(seq)
    if failed:
        raise PurgeIncomplete(f"deleted content still in the log at seqs {failed}")


# --- History: the state of each message on a page -------------------------------------

STATE_COLUMNS = "reply_to, edited_at_ms, deleted, has_reactions"


async def page_states(db: asyncpg.Pool, records: Sequence[asyncpg.Record]) -> list[bytes]:
    """Encoded MessageStates of the records that have any lifecycle at all."""
    touched = [
        r
        for r in records
        if r["reply_to"] or r["edited_at_ms"] or r["deleted"] or r["has_reactions"]
    ]
    if not touched:
        return []
    reactions: dict[str, list[pb.Reaction]] = {}
    with_reactions = [r["id"] for r in touched if r["has_reactions"]]
    if with_reactions:
        for row in await db.fetch(
            "SELECT message_id, emoji, array_agg(user_name ORDER BY user_name) AS users"
            " FROM reactions WHERE message_id = ANY($1) AND present"
            " GROUP BY message_id, emoji ORDER BY message_id, emoji",
            with_reactions,
        ):
            reactions.setdefault(row["message_id"], []).append(
                pb.Reaction(emoji=row["emoji"], users=list(row["users"]))
            )
    return [
        bytes(
            pb.MessageState(
                id=r["id"],
                edited_at_ms=r["edited_at_ms"] or 0,
                deleted=r["deleted"],
                reply_to=r["reply_to"] or "",
                reactions=reactions.get(r["id"], []),
            )
        )
        for r in touched
    ]


# --- Lookup and search -----------------------------------------------------------------


async def lookup(db: asyncpg.Pool, request: pb.MessageLookup) -> bytes:
    if not ids.is_valid_id(request.message_id):
        raise ServiceError("400", "message_id is not a message id")
    row = await db.fetchrow(
        "SELECT id, room, dm_lo, dm_hi, sender, ts_ms, deleted FROM messages WHERE id = $1",
        request.message_id,
    )
    if row is None:
        return bytes(pb.MessageInfo(found=False))
    return bytes(
        pb.MessageInfo(
            found=True, id=row["id"], room=row["room"] or "", dm_lo=row["dm_lo"] or "",
            dm_hi=row["dm_hi"] or "", sender=row["sender"], ts_ms=row["ts_ms"],
            deleted=row["deleted"],
        )
    )  # fmt: skip


SEARCH_LIMIT_MAX = 50
# ts_headline marks matches with private-use characters (no markup to escape).
HEADLINE_OPTIONS = "StartSel=\ue000, StopSel=\ue001, MaxWords=24, MinWords=8, MaxFragments=2"

# Newest first among what the requester may read: the rooms given (the gateway passes the
# session's rooms) and the requester's own DM threads. Deleted messages never match (their
# content is '' and they are excluded anyway). The headline runs on the page only.
SEARCH_SQL = f"""
SELECT id, room, dm_lo, dm_hi, sender, content, ts_ms,
       ts_headline('simple', content, query, '{HEADLINE_OPTIONS}') AS snippet
FROM (
    SELECT m.id, m.room, m.dm_lo, m.dm_hi, m.sender, m.content, m.ts_ms, q.query
    FROM messages m, websearch_to_tsquery('simple', $1) AS q(query)
    WHERE m.search @@ q.query AND NOT m.deleted AND m.id < $4
      AND (m.room = ANY($2::text[]) OR m.dm_lo = $3 OR m.dm_hi = $3)
    ORDER BY m.id DESC
    LIMIT $5
) AS page
ORDER BY id DESC
"""


async def run_search(
    db: asyncpg.Pool, query: str, rooms: list[str], requester: str, before_id: str, n: int
) -> list[asyncpg.Record]:
    return list(await db.fetch(SEARCH_SQL, query, rooms, requester, before_id or "~", n))


async def search(db: asyncpg.Pool, request: pb.SearchRequest) -> bytes:
    if not validate.is_valid_name(request.requester):
        raise ServiceError("400", "requester (the authenticated user) is missing or invalid")
    if not request.query.strip() or len(request.query) > 200:
        raise ServiceError("400", "query must be 1-200 characters")
    if any(not validate.is_valid_name(room) for room in request.rooms):
        raise ServiceError("400", "bad room name")
    if request.before_id and not ids.is_valid_id(request.before_id):
        raise ServiceError("400", "before_id is not a message id")
    limit = min(request.limit or 20, SEARCH_LIMIT_MAX)
    records = await run_search(
        db, request.query, list(request.rooms), request.requester, request.before_id, limit + 1
    )
    hits = []
    for r in records[:limit]:
        peer = ""
        if r["room"] is None:
            peer = r["dm_hi"] if r["sender"] == r["dm_lo"] else r["dm_lo"]
        message = wire.encode_message(
            r["id"], r["room"] or "", peer, r["sender"], r["content"], r["ts_ms"]
        )
        hits.append((message, r["snippet"] or ""))
    # chatlib.wire: betterproto2 would spend ~100 us per hit here.
    return wire.encode_search_page(hits, len(records) > limit)
