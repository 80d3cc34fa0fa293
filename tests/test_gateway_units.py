"""Pure logic of the gateway: limits, origins, frame parsing and rendering, tokens."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import jwt
import orjson
import pytest
from chatlib.auth import Authenticator, AuthError
from chatlib.limits import AbuseGuard, KeyedBuckets, TokenBucket
from chatlib.proto.chat import v1 as pb
from gateway import frames
from gateway.admission import RETRY_AFTER_MAX, Admission
from gateway.auth import origin_allowed
from gateway.batching import SharedRead
from gateway.frames import FrameError
from gateway.recovery import filter_groups
from gateway.session import _text_frame
from gateway.settings import GatewaySettings
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=20, burst=40, now=0.0)
    assert all(bucket.take(now=0.0) for _ in range(40))
    assert not bucket.take(now=0.0)
    assert bucket.take(now=0.05)  # one token back after 1/20 s
    assert not bucket.take(now=0.05)
    assert sum(bucket.take(now=100.0) for _ in range(100)) == 40  # never above the burst


def test_keyed_buckets_are_per_key_say_how_long_to_wait_and_stay_bounded() -> None:
    limits = KeyedBuckets(rate=0.5, burst=2, max_keys=3)
    assert limits.take("a", now=0.0) == 0.0 and limits.take("a", now=0.0) == 0.0
    assert limits.take("a", now=0.0) == pytest.approx(2.0)  # a token every 2 s
    assert limits.take("a", now=1.5) == pytest.approx(0.5)
    assert limits.take("b", now=1.5) == 0.0  # another key has its own allowance
    for key in ("c", "d", "e"):
        limits.take(key, now=2.0)
    assert len(limits.buckets) == 3 and "a" not in limits.buckets  # the oldest went


def test_abuse_needs_many_violations_within_the_window() -> None:
    guard = AbuseGuard(limit=3, window=10.0)
    assert not any(guard.violation(now=t) for t in (0.0, 1.0, 2.0))
    assert guard.violation(now=3.0)
    spaced = AbuseGuard(limit=3, window=10.0)
    assert not any(spaced.violation(now=t * 11.0) for t in range(10))


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "chat:8000", [], True),  # non-browser client
        ("http://chat:8000", "chat:8000", [], True),  # development: same host
        ("http://evil:8000", "chat:8000", [], False),
        ("https://chat.example", "gw-1:8000", ["https://chat.example"], True),
        ("https://chat.example/", "gw-1:8000", ["https://chat.example"], True),
        ("http://gw-1:8000", "gw-1:8000", ["https://chat.example"], False),
        ("null", "chat:8000", [], False),
    ],
)
def test_origin_allow_list(origin: str | None, host: str, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok


def test_parse_refuses_what_is_not_a_typed_object() -> None:
    for raw, code in [
        ("{", "bad_json"),
        ('"text"', "bad_json"),
        ("{}", "bad_frame"),
        ('{"type": 3}', "bad_frame"),
        ('{"type": "nope"}', "unknown_type"),
    ]:
        with pytest.raises(FrameError) as info:
            frames.parse(raw)
        assert info.value.code == code
    assert frames.parse('{"type": "ping"}') == {"type": "ping"}


def test_content_limit_counts_utf8_bytes() -> None:
    assert frames.content_of({"content": "é" * 2048}, 4096, "c") == "é" * 2048
    with pytest.raises(FrameError) as info:
        frames.content_of({"content": "é" * 2049}, 4096, "c")
    assert info.value.code == "content_too_large" and info.value.ref == "c"


def test_a_message_is_rendered_once_with_client_id_only_for_its_sender() -> None:
    msg = pb.ChatMessage(
        id="01J", dm_peer="bob", sender="alice", content="hi", ts_ms=5, client_id="c1"
    )
    rendered = frames.MessageFrames(msg, 42)
    own, other = rendered.for_user("alice"), rendered.for_user("bob")
    assert rendered.for_user("alice") is own and rendered.for_user("carol") is other
    assert orjson.loads(own) == {
        "type": "message",
        "id": "01J",
        "seq": 42,
        "to": "bob",
        "sender": "alice",
        "content": "hi",
        "ts": 5,
        "client_id": "c1",
    }
    assert "client_id" not in orjson.loads(other)


def test_recovery_filters_do_not_overlap_within_one_consumer() -> None:
    mine, theirs = filter_groups("alice", ["lobby", "dev"])
    assert mine == ["chat.room.dev", "chat.room.lobby", "chat.dm.alice.*"]
    assert theirs == ["chat.dm.*.alice"]


def test_guest_tokens_round_trip_and_expire() -> None:
    auth = Authenticator(GatewaySettings(guest_token_ttl=60))
    token, expires_ms = auth.issue_guest("alice")
    assert auth.verify(token) == "alice"
    assert expires_ms > time.time() * 1000
    old, _ = auth.issue_guest("alice", now=time.time() - 120)
    with pytest.raises(AuthError):
        auth.verify(old)
    with pytest.raises(AuthError):
        auth.verify(jwt.encode({"sub": "Bad Name", "exp": 2**40}, "x" * 32, "HS256"))


def test_jwt_mode_uses_preferred_username_and_checks_issuer() -> None:
    secret = "s" * 32
    auth = Authenticator(
        GatewaySettings(auth_mode="jwt", jwt_secret=secret, jwt_issuer="https://idp")
    )
    claims = {"sub": "id-1", "preferred_username": "bob", "iss": "https://idp", "exp": 2**40}
    assert auth.verify(jwt.encode(claims, secret, "HS256")) == "bob"
    with pytest.raises(AuthError):
        auth.verify(jwt.encode({**claims, "iss": "https://other"}, secret, "HS256"))
    guest = Authenticator(GatewaySettings()).issue_guest("bob")[0]
    with pytest.raises(AuthError):
        auth.verify(guest)


async def test_hellos_arriving_together_share_one_read_but_never_an_already_sent_one() -> None:
    reads: list[asyncio.Future[int]] = []

    async def read() -> int:
        reads.append(asyncio.get_running_loop().create_future())
        return await reads[-1]

    shared: SharedRead[int] = SharedRead(read)
    first = [asyncio.create_task(shared.get()) for _ in range(3)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(reads) == 1  # three callers, one read in flight
    late = [asyncio.create_task(shared.get()) for _ in range(2)]
    await asyncio.sleep(0)
    assert len(reads) == 1  # the late ones wait for the next read, not the sent one
    reads[0].set_result(10)
    assert await asyncio.gather(*first) == [10, 10, 10]
    assert len(reads) == 2  # the next read went out as soon as the first was answered
    reads[1].set_result(11)
    assert await asyncio.gather(*late) == [11, 11]
    assert len(reads) == 2


async def test_a_failed_shared_read_fails_its_callers_and_the_next_read_starts_fresh() -> None:
    calls = 0

    async def read() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("nats is slow")
        return 7

    shared: SharedRead[int] = SharedRead(read)
    with pytest.raises(TimeoutError):
        await shared.get()
    assert await shared.get() == 7


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_frames_written_straight_to_the_socket_are_what_websockets_would_send(size: int) -> None:
    payload = b"x" * size
    assert _text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


async def test_admission_learns_its_greeting_rate_only_while_hellos_wait() -> None:
    now = [0.0]
    admission = Admission(concurrency=2, queue=100, retry_after=2, clock=lambda: now[0])

    async def greet(count: int, seconds: float, waiting: int) -> None:
        """`count` hellos greeted over `seconds`, with `waiting` more sockets queued."""
        queued = [admission.ticket() for _ in range(waiting)]
        for _ in range(count):
            ticket = admission.ticket()
            await ticket.turn()
            now[0] += seconds / count
            ticket.done()
        for ticket in queued:
            ticket.done()

    # Idle: one hello every 10 s says nothing about how many it could greet. A storm's
    # first wave must not be refused for an hour (Retry-After stays the floor).
    await greet(3, 30.0, waiting=0)
    held = [admission.ticket() for _ in range(60)]
    assert not admission.full()
    assert admission.retry_after() == 2
    for ticket in held:
        ticket.done()
    # Saturated (sockets waiting for a turn): 50 greeted/s is the drain rate.
    await greet(100, 2.0, waiting=10)
    held = [admission.ticket() for _ in range(80)]
    assert not admission.full()  # within QUEUE_SECONDS of greeting, below the hard limit
    assert admission.retry_after() == 2  # 80 waiting drain in under 2 s
    held += [admission.ticket() for _ in range(22)]
    assert admission.full()  # the hard limit: concurrency + queue
    for ticket in held:
        ticket.done()
    # Slow greeting (1/s): a long queue, but never sent away for more than RETRY_AFTER_MAX.
    await greet(10, 10.0, waiting=60)
    held = [admission.ticket() for _ in range(60)]
    assert admission.full()
    assert admission.retry_after() == RETRY_AFTER_MAX
    for ticket in held:
        ticket.done()


async def test_refused_clients_are_given_turns_at_the_pace_the_gateway_greets() -> None:
    """A storm's refused clients come back spread over time at the greeting rate, not all
    at the drain time (refused again together) nor over [RA, 2 RA] (the gateway idle
    while the last of them wait)."""
    now = [0.0]
    admission = Admission(concurrency=2, queue=100, retry_after=2, clock=lambda: now[0])
    first = admission.ticket()  # a hello at startup, then quiet until the storm
    await first.turn()
    first.done()
    now[0] = 120.0
    held = [admission.ticket() for _ in range(10)]  # hellos waiting: the rate is learnt
    for _ in range(100):  # 50 greeted a second
        ticket = admission.ticket()
        await ticket.turn()
        now[0] += 0.02
        ticket.done()
    held += [admission.ticket() for _ in range(90)]  # 100 waiting: 2 s to drain
    turns = [admission.retry_after() for _ in range(500)]
    assert turns == sorted(turns)
    assert turns[0] == 2
    # Each later second is handed to about as many clients as are greeted in a second.
    per_second = Counter(turns)
    assert all(49 <= per_second[second] <= 51 for second in range(4, 11))
    assert max(turns) == 11  # the 500th: after 100 waiting + 499 turns, at 50 a second
    # Past RETRY_AFTER_MAX no turn is handed out: come back then (and get one then).
    late = [admission.retry_after() for _ in range(5000)]
    assert max(late) == RETRY_AFTER_MAX
    assert late.count(RETRY_AFTER_MAX) > 4000
    # Once the storm is over, the turns start from the queue again.
    for ticket in held:
        ticket.done()
    now[0] += 60
    assert admission.retry_after() == 2


# --- durable sends in flight per socket (gateway/session.py) ----------------------------------
async def test_a_socket_has_at_most_max_sends_in_flight_and_settles_them() -> None:
    from gateway.session import MAX_SENDS_IN_FLIGHT, Session

    async def send(event: dict[str, object]) -> None:
        return None

    session = Session("bob", send, GatewaySettings())
    for _ in range(MAX_SENDS_IN_FLIGHT):
        await asyncio.wait_for(session.send_started(), 1)
    # One more waits for a slot (the receive loop then reads no further frame) ...
    extra = asyncio.create_task(session.send_started())
    settling = asyncio.create_task(session.settle_sends())
    await asyncio.sleep(0.05)
    assert not extra.done() and not settling.done()
    # ... until one of them is answered.
    session.send_done()
    await asyncio.wait_for(extra, 1)
    assert session.sends == MAX_SENDS_IN_FLIGHT
    for _ in range(MAX_SENDS_IN_FLIGHT - 1):
        session.send_done()
    await asyncio.sleep(0.05)
    assert not settling.done()  # one still out
    session.send_done()
    await asyncio.wait_for(settling, 1)
    assert session.sends == 0


# --- message ids (chatlib/ids.py) ------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.integers(0, (1 << 60) - 1), st.integers(0, (1 << 90) - 1))
def test_an_id_is_written_as_the_character_loop_writes_it(ms: int, rand: int) -> None:
    from chatlib import ids

    expected = ids._encode(ms, 10) + ids._encode(rand & ((1 << 80) - 1), 16)
    assert ids._encode_id(ms, rand) == expected
    assert ids.is_valid_id(expected)
    assert ms >= 1 << 50 or ids.id_time_ms(expected) == ms


# --- lock-free metrics (gateway/metrics.py), pinned to prometheus_client's exposition ----------
def _exposition(collector: object) -> list[str]:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 10) | st.sampled_from([0.0, 0.001, 0.0025, 5.0, 7.5]), max_size=20))
def test_the_plain_histogram_exposes_what_the_library_histogram_does(values: list[float]) -> None:
    from gateway.metrics import PlainHistogram
    from prometheus_client import CollectorRegistry, Histogram

    buckets = (0.001, 0.0025, 0.005, 1.0, 5.0)
    ours = PlainHistogram("h_seconds", "doc", buckets)
    theirs = Histogram("h_seconds", "doc", buckets=buckets, registry=CollectorRegistry())
    for value in values:
        ours.observe(value)
        theirs.observe(value)
    assert _exposition(ours) == _exposition(theirs)


def test_the_plain_labelled_counter_exposes_what_the_library_counter_does() -> None:
    from gateway.metrics import PlainLabelledCounter
    from prometheus_client import CollectorRegistry, Counter

    ours = PlainLabelledCounter("frames_in", "doc", "type")
    theirs = Counter("frames_in_total", "doc", ["type"], registry=CollectorRegistry())
    for kind, n in (("send", 3), ("ping", 1), ("send", 2), ('a"b', 1)):
        ours.labels(kind).value += n
        theirs.labels(kind).inc(n)
    assert _exposition(ours) == _exposition(theirs)
