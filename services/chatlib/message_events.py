"""What a chat subject carries: messages and the events that change them (issue 14).

Edits, deletes and reactions travel on the subject of the message they change, so the CHAT
stream orders them with it and every guarantee of a send (JetStream ack, deduplication on
sender + client_id, live republish, reconnect replay, the ARCHIVE work queue) holds for
them too. The `Chat-Type` header tells them apart; a payload without it is a ChatMessage
(what producers wrote before the header was required).
"""

from __future__ import annotations

from typing import TypeAlias, cast

from chatlib import codec, idempotency, names
from chatlib.proto.chat import v1 as pb

Lifecycle: TypeAlias = pb.MessageEdit | pb.MessageDelete | pb.ReactionChange
ChatEvent: TypeAlias = pb.ChatMessage | Lifecycle

LIFECYCLE_TYPES: tuple[type[Lifecycle], ...] = (pb.MessageEdit, pb.MessageDelete, pb.ReactionChange)
_CHAT_TYPES: dict[str, type[ChatEvent]] = {
    codec.type_name(cls()): cls for cls in (pb.ChatMessage, *LIFECYCLE_TYPES)
}

# The reactions a message can get: a small fixed set, so a reaction is one of a few known
# strings (no arbitrary text hides in it) and every client can show every one.
EMOJI: tuple[str, ...] = (
    "\U0001f44d",  # thumbs up
    "\U0001f44e",  # thumbs down
    "\u2764\ufe0f",  # red heart
    "\U0001f602",  # face with tears of joy
    "\U0001f62e",  # face with open mouth
    "\U0001f622",  # crying face
    "\U0001f389",  # party popper
    "\U0001f440",  # eyes
)
EMOJI_SET = frozenset(EMOJI)

# Edits are allowed for this long after the message was sent (the gateway's setting
# lifecycle_edit_window_s defaults to it; the archive refuses later ones too).
DEFAULT_EDIT_WINDOW_S = 24 * 3600


def decode_chat(data: bytes, headers: dict[str, str] | None) -> ChatEvent:
    """A payload from a chat subject; codec.DecodeError for anything else."""
    declared = (headers or {}).get(names.HEADER_TYPE)
    if declared is None:
        return codec.decode_as(pb.ChatMessage, data, headers)
    cls = _CHAT_TYPES.get(declared)
    if cls is None:
        raise codec.DecodeError(f"{declared!r} is not carried on chat subjects")
    return cast(ChatEvent, codec.decode_as(cls, data, headers))


def subject_of(event: ChatEvent) -> str:
    """The chat subject an event (or message) is published on."""
    if event.room:
        return names.room_subject(event.room)
    return names.dm_subject(event.sender, event.dm_peer)


def fingerprint(event: ChatEvent) -> str:
    """The request an event answers, for chatlib.idempotency: a client_id reused for
    another edit, another message, or another emoji is a conflict, not a retry."""
    if isinstance(event, pb.ChatMessage):
        return idempotency.fingerprint(event)
    target = event.room or f"dm:{event.dm_peer}"
    if isinstance(event, pb.MessageEdit):
        return idempotency.request_hash(
            "chat.v1.MessageEdit", target, event.message_id, event.content
        )
    if isinstance(event, pb.MessageDelete):
        return idempotency.request_hash("chat.v1.MessageDelete", target, event.message_id)
    return idempotency.request_hash(
        "chat.v1.ReactionChange", target, event.message_id, event.emoji, str(event.removed)
    )


def stored_fingerprint(data: bytes, headers: dict[str, str] | None) -> str:
    found = (headers or {}).get(names.HEADER_REQUEST_HASH, "")
    if found.startswith(idempotency.HASH_SCHEME):
        return found
    try:
        return fingerprint(decode_chat(data, headers))
    except codec.DecodeError:
        return ""


def deleted_ids(events: dict[int, ChatEvent]) -> set[str]:
    """Ids of the messages a batch of events deletes."""
    return {e.message_id for e in events.values() if isinstance(e, pb.MessageDelete)}


def honour_deletes(events: dict[int, ChatEvent]) -> dict[int, ChatEvent]:
    """A replay without the content of the messages it deletes: the message itself and its
    edits and reactions are left out, its delete stays (a client that has it shows a
    tombstone). Covers the moment between a delete and the archive removing the original
    from the CHAT stream (see archive.lifecycle)."""
    gone = deleted_ids(events)
    if not gone:
        return events
    kept: dict[int, ChatEvent] = {}
    for seq, event in events.items():
        if isinstance(event, pb.ChatMessage):
            if event.id in gone:
                continue
        elif not isinstance(event, pb.MessageDelete) and event.message_id in gone:
            continue
        kept[seq] = event
    return kept
