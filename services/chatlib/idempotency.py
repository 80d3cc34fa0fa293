"""Idempotency keys: a client_id names one request, never two.

A durable send is published with `Nats-Msg-Id` = sender + client_id (names.dedup_id), so
JetStream stores it once per key within the CHAT stream's duplicate window and answers a
re-publish with `PubAck.duplicate` and the original's sequence. That alone would ack a
*different* message that reuses the key with the original's id, and silently drop it.

So every stored message also carries `Chat-Request-Hash`: a hash of what was asked (the
payload type, the kind of target, the target, the content; the sender is part of the
key). On a duplicate PubAck the publisher reads the stored message back and compares:

- same hash: a true retry, answered with the original (a replay);
- another hash: the key was reused for another request -> IdempotencyConflict, and
  nothing is acked (JetStream stored nothing and republished nothing for the duplicate).

The comparison uses only what JetStream keeps (its duplicate table and the stored
message), so it holds across gateways, chatctl and the client library, and across the
crash of whoever published first. Messages stored before the header existed are
compared by the same hash computed from their decoded fields.

Every frame kind that carries a client_id (send and dm today; edits, deletes and
reactions later) must go through `fingerprint` and `check_replay`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from chatlib import codec, names
from chatlib.proto.chat import v1 as pb


class IdempotencyConflict(Exception):
    """The idempotency key was already used, within the duplicate window, for a
    different request; the new request was not stored."""

    def __init__(self, client_id: str) -> None:
        super().__init__(
            f"client_id {client_id!r} was already used for a different request; "
            "use a new client_id for a new message"
        )
        self.client_id = client_id


# Names the hash below. A stored hash of another scheme (a future change of it, during a
# rolling upgrade) is not compared: the stored message's fields are hashed instead.
HASH_SCHEME = "b2:"


def request_hash(kind: str, *parts: str) -> str:
    """A hash of one request: its kind (payload type and target kind) and its parts.
    Each part is length-prefixed, so no choice of content can collide by shifting a
    separator. 128 bits of BLAKE2b, as 32 hex characters after the scheme's prefix."""
    h = hashlib.blake2b(digest_size=16)
    for part in (kind, *parts):
        raw = part.encode()
        h.update(len(raw).to_bytes(4, "big"))
        h.update(raw)
    return HASH_SCHEME + h.hexdigest()


def fingerprint(message: pb.ChatMessage) -> str:
    """The request a ChatMessage answers: where it goes and what it says. Not its id or
    time (a retry through another gateway mints new ones), not its sender (part of the
    key). A reply is another request than the same words replying to nothing (or to
    another message); a message that replies to nothing hashes as before replies existed,
    so hashes already stored stay comparable."""
    target = ("room", message.room) if message.room else ("dm", message.dm_peer)
    if message.reply_to:
        return request_hash(
            f"chat.v1.ChatMessage/{target[0]}+reply", target[1], message.content, message.reply_to
        )
    return request_hash(f"chat.v1.ChatMessage/{target[0]}", target[1], message.content)


def stored_fingerprint(data: bytes, headers: Mapping[str, str] | None) -> str:
    """The request hash of a stored message: its header, or (a message stored before
    the header existed) computed from its fields. '' when it cannot be known."""
    found = (headers or {}).get(names.HEADER_REQUEST_HASH, "")
    if found.startswith(HASH_SCHEME):
        return found
    try:
        return fingerprint(codec.decode_as(pb.ChatMessage, data, dict(headers or {})))
    except codec.DecodeError:
        return ""


def check_replay(
    expected: str, client_id: str, data: bytes, headers: Mapping[str, str] | None
) -> None:
    """Raise IdempotencyConflict unless the stored message (data, headers) was made by
    the same request as the one whose fingerprint is `expected`."""
    if stored_fingerprint(data, headers) != expected:
        raise IdempotencyConflict(client_id)
