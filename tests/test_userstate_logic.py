"""The pure logic of user state: who a message names, and how unapplied events lay over
what Postgres holds (applied in stream order, memberships by event sequence, markers
only forward)."""

from __future__ import annotations

import pytest
from archive.userstate import Event, Tail, overlay
from chatlib import mentions
from chatlib.proto.chat import v1 as pb


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("@alice hi", ["alice"]),
        ("hi @alice, and @bob-2!", ["alice", "bob-2"]),
        ("(@alice)", ["alice"]),
        ("@alice @alice", ["alice"]),
        ("mail alice@example.org", []),  # an address names nobody
        ("@Alice", []),  # names are lowercase
        ("@@alice", []),
        ("@bob-x", ["bob-x"]),  # the longest name, never a prefix of it
        ("@" + "a" * 33, []),  # longer than a name can be
        ("no mention", []),
    ],
)
def test_a_message_names_users_with_at_name(content: str, named: list[str]) -> None:
    assert mentions.mentioned(content) == named


def test_a_message_names_at_most_twenty_users() -> None:
    content = " ".join(f"@u{i}" for i in range(50))
    assert mentions.mentioned(content) == [f"u{i}" for i in range(mentions.MAX_MENTIONS)]


def member(seq: int, room: str, joined: bool) -> Event:
    return Event(seq, pb.MembershipEvent(id=f"e{seq}", user="al", room=room, joined=joined))


def read(seq: int, room: str, upto: int) -> Event:
    return Event(seq, pb.ReadEvent(id=f"e{seq}", user="al", room=room, seq=upto))


def test_unapplied_events_lay_over_the_stored_state_in_stream_order() -> None:
    stored_rooms = {"dev": 5, "ops": 2}
    stored_marks = {"r:dev": 100}
    tail = Tail(
        [
            member(9, "ops", True),
            member(7, "ops", False),  # out of order: 9 wins
            member(4, "dev", False),  # older than the stored row (5): ignored
            member(8, "new", True),
            read(10, "dev", 90),  # behind the stored marker: ignored
            read(11, "new", 3),
        ]
    )
    rooms, marks = overlay(stored_rooms, stored_marks, tail)
    assert rooms == {"dev": 5, "ops": 9, "new": 8}
    assert marks == {"r:dev": 100, "r:new": 3}


def test_a_leave_in_the_tail_removes_a_stored_room() -> None:
    rooms, _ = overlay({"dev": 5}, {}, Tail([member(6, "dev", False)]))
    assert rooms == {}


def test_an_older_join_still_in_the_tail_does_not_undo_a_stored_leave() -> None:
    """Two replicas: the leave (seq 10) was applied before the join (seq 8) was acked."""
    rooms, _ = overlay({}, {}, Tail([member(8, "dev", True)]), left_rooms={"dev": 10})
    assert rooms == {}
