"""The hand-written UserState protobuf (chatlib.userstate_wire) against betterproto2: the
same bytes out, the same values in, and never accepting a payload the codec refuses."""

from __future__ import annotations

from chatlib import codec, userstate_wire
from chatlib.proto.chat import v1 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

texts = st.text(max_size=20)
uint32s = st.integers(min_value=0, max_value=2**32 - 1)
uint64s = st.integers(min_value=0, max_value=2**64 - 1)
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
threads = st.builds(
    pb.ThreadState,
    room=texts,
    dm_peer=texts,
    unread=uint32s,
    mentions=uint32s,
    read_seq=uint64s,
    last_seq=uint64s,
    last_ts_ms=int64s,
    read_id=texts,
)
states = st.builds(
    pb.UserState,
    rooms=st.lists(st.text(min_size=1, max_size=20), max_size=5),
    threads=st.lists(threads, max_size=5),
    archived_through=uint64s,
    first_use=st.booleans(),
)


def as_tuple(state: pb.UserState) -> userstate_wire.State:
    return userstate_wire.State(
        list(state.rooms),
        [
            userstate_wire.Thread(
                t.room, t.dm_peer, t.unread, t.mentions, t.read_seq, t.last_seq,
                t.last_ts_ms, t.read_id,
            )
            for t in state.threads
        ],
        state.archived_through,
        state.first_use,
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(states)
def test_user_states_are_encoded_and_read_as_betterproto_does(state: pb.UserState) -> None:
    mine = as_tuple(state)
    data = userstate_wire.encode_user_state(
        mine.rooms, mine.threads, mine.archived_through, mine.first_use
    )
    assert data == bytes(state)
    assert userstate_wire.parse_user_state(data) == mine


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_fast_parse_never_accepts_what_the_codec_refuses(data: bytes) -> None:
    parsed = userstate_wire.parse_user_state(data)
    if parsed is None:
        return
    decoded = codec.decode_as(pb.UserState, data)
    assert as_tuple(decoded) == parsed
