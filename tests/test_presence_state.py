"""The presence rules on their own (pure logic, no network): reports in any order end in
the truth, and each online/offline transition queues exactly one event."""

from __future__ import annotations

from presence.mirror import Mirror
from presence.state import TOMBSTONE_TTL_MS, UserState, user_key


def test_a_close_handled_before_its_open_leaves_no_ghost() -> None:
    state = UserState()
    assert state.close("c1", now_ms=1000)
    assert not state.open("c1", "gw", ts_ms=900, now_ms=1001)
    assert not state.online


def test_a_heartbeat_taken_before_a_close_cannot_bring_the_connection_back() -> None:
    state = UserState()
    state.open("c1", "gw", ts_ms=100, now_ms=100)
    state.close("c1", now_ms=200)
    assert not state.open("c1", "gw", ts_ms=150, now_ms=300)  # the heartbeat's re-add
    assert not state.online


def test_a_heartbeat_drops_only_connections_opened_before_it() -> None:
    state = UserState()
    state.open("old", "gw", ts_ms=100, now_ms=100)
    state.open("new", "gw", ts_ms=250, now_ms=250)
    assert state.drop_unlisted("old", "gw", hb_ts_ms=200, now_ms=300)
    assert not state.drop_unlisted("new", "gw", hb_ts_ms=200, now_ms=300)
    assert not state.drop_unlisted("new", "other-gw", hb_ts_ms=900, now_ms=300)
    assert set(state.conns) == {"new"}


def test_each_transition_queues_one_event_and_other_changes_none() -> None:
    state = UserState()
    was = state.online
    state.open("tab1", "gw", 1, 1)
    assert state.note_transition(was, 1) is not None
    was = state.online
    state.open("tab2", "gw", 2, 2)
    assert state.note_transition(was, 2) is None
    was = state.online
    state.close("tab1", 3)
    assert state.note_transition(was, 3) is None
    was = state.online
    state.close("tab2", 4)
    assert state.note_transition(was, 4) is not None
    assert [e.kind for e in state.pending] == ["online", "offline"]
    assert len({e.event_id for e in state.pending}) == 2


def test_state_survives_encoding_and_tombstones_expire() -> None:
    state = UserState()
    state.open("c1", "gw", 5, 6)
    state.close("c2", 10)
    assert UserState.decode(state.encode()) == state
    assert not state.idle(10)
    state.close("c1", 10)
    assert state.prune(10 + TOMBSTONE_TTL_MS + 1)
    assert state.idle(10 + TOMBSTONE_TTL_MS + 1)


def test_who_pages_split_everyone_in_name_order() -> None:
    mirror = Mirror()
    for rev, user in enumerate(["carol", "alice", "bob", "dave", "erin"], start=1):
        state = UserState()
        state.open(f"c-{user}", "gw", 1, 1)
        mirror.apply(user_key(user), state.encode(), rev)
    assert mirror.page("", 2) == (["alice", "bob"], "bob", 5)
    assert mirror.page("bob", 2) == (["carol", "dave"], "dave", 5)
    assert mirror.page("dave", 2) == (["erin"], "", 5)
    assert mirror.page("", 10) == (["alice", "bob", "carol", "dave", "erin"], "", 5)
    assert mirror.conns_of("gw") == {f"c-{u}": u for u in ["alice", "bob", "carol", "dave", "erin"]}
    mirror.apply(user_key("bob"), None, 9, deleted=True)
    assert mirror.online_sorted() == ["alice", "carol", "dave", "erin"]
    assert mirror.connections == 4
