"""chatlib.idempotency: what makes two sends with one client_id the same request."""

from __future__ import annotations

import pytest
from chatlib import codec, idempotency, names
from chatlib.proto.chat import v1 as pb


def message(**fields: object) -> pb.ChatMessage:
    base: dict[str, object] = {
        "id": "01JAAAAAAAAAAAAAAAAAAAAAAA",
        "room": "lobby",
        "sender": "alice",
        "content": "hi",
        "ts_ms": 1,
        "client_id": "k1",
    }
    base.update(fields)
    return pb.ChatMessage(**base)  # type: ignore[arg-type]


def test_a_retry_has_the_same_fingerprint_whatever_id_time_or_gateway() -> None:
    retry = message(id="01JBBBBBBBBBBBBBBBBBBBBBBB", ts_ms=99)
    assert idempotency.fingerprint(retry) == idempotency.fingerprint(message())
    assert idempotency.fingerprint(retry).startswith(idempotency.HASH_SCHEME)
    assert len(idempotency.fingerprint(retry)) == len(idempotency.HASH_SCHEME) + 32


@pytest.mark.parametrize(
    "other",
    [
        {"content": "hi!"},
        {"room": "dev"},
        {"room": "", "dm_peer": "lobby"},  # a DM to a user named like the room
        {"content": "hi "},
        {"reply_to": "01JCCCCCCCCCCCCCCCCCCCCCCC"},  # the same words, as a reply
    ],
)
def test_another_target_or_content_is_another_request(other: dict[str, object]) -> None:
    assert idempotency.fingerprint(message(**other)) != idempotency.fingerprint(message())


def test_replies_to_different_messages_are_different_requests_and_plain_hashes_hold() -> None:
    one = message(reply_to="01JCCCCCCCCCCCCCCCCCCCCCCC")
    other = message(reply_to="01JDDDDDDDDDDDDDDDDDDDDDDD")
    assert idempotency.fingerprint(one) != idempotency.fingerprint(other)
    assert idempotency.fingerprint(one) == idempotency.fingerprint(
        message(**{"reply_to": one.reply_to, "ts_ms": 5})
    )
    # A message without reply_to hashes as it did before replies existed (stored
    # Chat-Request-Hash headers of older messages must still compare equal).
    assert idempotency.fingerprint(message()) == idempotency.request_hash(
        "chat.v1.ChatMessage/room", "lobby", "hi"
    )


def test_parts_cannot_collide_by_moving_a_separator() -> None:
    assert idempotency.request_hash("k", "ab", "c") != idempotency.request_hash("k", "a", "bc")
    assert idempotency.request_hash("k", "a\x00", "b") != idempotency.request_hash(
        "k", "a", "\x00b"
    )


def test_check_replay_compares_with_the_stored_header_or_the_stored_fields() -> None:
    original = message()
    data, headers = codec.encode(original)
    expected = idempotency.fingerprint(original)
    hashed = {**headers, names.HEADER_REQUEST_HASH: expected}
    idempotency.check_replay(expected, "k1", data, hashed)  # a true retry
    # A message stored before the header existed: compared by its decoded fields.
    idempotency.check_replay(expected, "k1", data, headers)
    other = idempotency.fingerprint(message(content="bye"))
    for stored_headers in (hashed, headers):
        with pytest.raises(idempotency.IdempotencyConflict) as err:
            idempotency.check_replay(other, "k1", data, stored_headers)
        assert err.value.client_id == "k1" and "different" in str(err.value)
    # A hash of an unknown scheme is not compared: the stored fields are.
    unknown = {**headers, names.HEADER_REQUEST_HASH: "zz:" + expected}
    idempotency.check_replay(expected, "k1", data, unknown)
    # What cannot be read cannot be a replay of anything.
    with pytest.raises(idempotency.IdempotencyConflict):
        idempotency.check_replay(expected, "k1", b"\xff\xff", headers)
