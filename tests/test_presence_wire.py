"""The hand-written Heartbeat protobuf (chatlib.presence_wire) against betterproto2: the
same bytes out, the same values in, and never accepting a payload the codec refuses."""

from __future__ import annotations

from chatlib import codec, presence_wire
from chatlib.proto.chat import v1 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

texts = st.text(max_size=20)
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
heartbeats = st.builds(
    pb.Heartbeat,
    gateway_id=texts,
    connections=st.lists(st.builds(pb.Connection, connection_id=texts, user=texts), max_size=5),
    ts_ms=int64s,
)


def as_tuple(beat: pb.Heartbeat) -> presence_wire.Heartbeat:
    return presence_wire.Heartbeat(
        beat.gateway_id,
        [presence_wire.Connection(c.connection_id, c.user) for c in beat.connections],
        beat.ts_ms,
    )


@settings(max_examples=300, deadline=None)
@given(heartbeats)
def test_heartbeats_are_encoded_and_read_as_betterproto_does(beat: pb.Heartbeat) -> None:
    entries = [presence_wire.encode_connection(c.connection_id, c.user) for c in beat.connections]
    data = presence_wire.encode_heartbeat(beat.gateway_id, entries, beat.ts_ms)
    assert data == bytes(beat)
    assert presence_wire.parse_heartbeat(data) == as_tuple(beat)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60))
def test_what_the_fast_reader_accepts_the_codec_reads_the_same(data: bytes) -> None:
    mine = presence_wire.parse_heartbeat(data)
    if mine is None:
        return
    assert as_tuple(codec.decode_as(pb.Heartbeat, data)) == mine


@settings(max_examples=300, deadline=None)
@given(heartbeats, st.data())
def test_corrupted_heartbeats_are_never_read_differently(
    beat: pb.Heartbeat, data: st.DataObject
) -> None:
    raw = bytearray(bytes(beat))
    if raw:
        i = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[i] = data.draw(st.integers(min_value=0, max_value=255))
        cut = data.draw(st.integers(min_value=0, max_value=len(raw)))
        raw = raw[:cut]
    mine = presence_wire.parse_heartbeat(bytes(raw))
    if mine is None:
        return
    assert as_tuple(codec.decode_as(pb.Heartbeat, bytes(raw))) == mine


def test_a_non_canonical_heartbeat_is_left_to_the_codec() -> None:
    # Fields out of order: valid protobuf, not what our writers produce.
    beat = pb.Heartbeat(gateway_id="g1", connections=[pb.Connection("c1", "ann")], ts_ms=5)
    data = bytes(beat)
    swapped = data[data.index(b"\x12") :] + data[: data.index(b"\x12")]
    assert presence_wire.parse_heartbeat(swapped) is None
    assert codec.decode_as(pb.Heartbeat, swapped).gateway_id == "g1"


@settings(max_examples=300, deadline=None)
@given(texts, int64s, st.sampled_from([pb.UserOnline, pb.UserOffline]))
def test_user_events_are_read_as_betterproto_does(user: str, ts_ms: int, cls: type) -> None:
    assert presence_wire.parse_user_event(bytes(cls(user=user, ts_ms=ts_ms))) == (user, ts_ms)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_what_the_event_reader_accepts_the_codec_reads_the_same(data: bytes) -> None:
    mine = presence_wire.parse_user_event(data)
    if mine is None:
        return
    event = codec.decode_as(pb.UserOnline, data)
    assert (event.user, event.ts_ms) == mine


@settings(max_examples=300, deadline=None)
@given(texts, texts, texts, int64s, st.sampled_from([pb.ConnectionOpened, pb.ConnectionClosed]))
def test_connection_reports_are_encoded_as_betterproto_does(
    gateway: str, connection: str, user: str, ts_ms: int, cls: type
) -> None:
    data = presence_wire.encode_connection_event(gateway, connection, user, ts_ms)
    assert data == bytes(cls(gateway_id=gateway, connection_id=connection, user=user, ts_ms=ts_ms))


@settings(max_examples=300, deadline=None)
@given(texts, texts, texts, int64s, st.sampled_from([pb.ConnectionOpened, pb.ConnectionClosed]))
def test_connection_reports_are_read_as_betterproto_does(
    gateway: str, connection: str, user: str, ts_ms: int, cls: type
) -> None:
    data = bytes(cls(gateway_id=gateway, connection_id=connection, user=user, ts_ms=ts_ms))
    assert presence_wire.parse_connection_event(data) == (gateway, connection, user, ts_ms)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_what_the_report_reader_accepts_the_codec_reads_the_same(data: bytes) -> None:
    fast = presence_wire.parse_connection_event(data)
    if fast is None:
        return
    slow = codec.decode_as(pb.ConnectionOpened, data)
    assert fast == (slow.gateway_id, slow.connection_id, slow.user, slow.ts_ms)


@settings(max_examples=300, deadline=None)
@given(texts, int64s, st.sampled_from([pb.UserOnline, pb.UserOffline]))
def test_user_events_are_encoded_as_betterproto_does(user: str, ts_ms: int, cls: type) -> None:
    assert presence_wire.encode_user_event(user, ts_ms) == bytes(cls(user=user, ts_ms=ts_ms))
