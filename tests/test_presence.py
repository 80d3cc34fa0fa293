"""Presence as a whole: real NATS, real presence processes, stand-in gateway processes that
report through chatlib.presence_client and are SIGKILLed for real."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path

import pytest
from chatlib import codec, names, presence_client
from chatlib.proto.chat import v1 as pb
from nats.aio.client import Client as NATS

from tests.presence_fixtures import (
    TEST_GATEWAY_EXPIRY,
    TEST_HEARTBEAT_INTERVAL,
    EventLog,
    FakeGateway,
    PresenceReplicas,
    event_log,
    gateways,
    live_connections,
    new_id,
    presence_replicas,
    start_gateway,
)
from tests.waiting import wait_until

__all__ = ["event_log", "gateways", "presence_replicas"]  # fixtures used by name

# The crash bound with the test settings, mirroring the default budget in the docs:
# last heartbeat up to one interval before the kill, expiry, then one sweep and a write.
CRASH_BOUND = TEST_GATEWAY_EXPIRY + TEST_HEARTBEAT_INTERVAL + 1.0


async def test_two_tabs_stay_online_when_one_closes_and_go_offline_within_1s_of_the_last(
    nc: NATS,
    presence_replicas: PresenceReplicas,
    gateways: list[FakeGateway],
    event_log: EventLog,
    nats_server: object,
    logs_dir: Path,
) -> None:
    presence_replicas.start(1)
    gw = await start_gateway(gateways, nats_server.url, logs_dir, "gw-a")  # type: ignore[attr-defined]
    tab1, tab2 = new_id(), new_id()
    await gw.open(tab1, "alice")
    await gw.open(tab2, "alice")
    await wait_until(lambda: event_log.of("alice") == ["online"], "alice online")
    await wait_until(lambda: _eq(live_connections(nc, "alice"), {tab1, tab2}), "both tabs recorded")

    await gw.close(tab1, "alice")
    await wait_until(lambda: _eq(live_connections(nc, "alice"), {tab2}), "first tab gone")
    assert event_log.of("alice") == ["online"]
    assert await presence_client.who_all(nc) == ["alice"]

    closed_at = time.monotonic()
    await gw.close(tab2, "alice")
    await wait_until(lambda: event_log.of("alice") == ["online", "offline"], "alice offline", 2)
    assert time.monotonic() - closed_at < 1.0
    assert await presence_client.who_all(nc) == []


async def test_killed_gateway_takes_its_users_offline_within_the_bound_but_not_users_also_elsewhere(
    nc: NATS,
    presence_replicas: PresenceReplicas,
    gateways: list[FakeGateway],
    event_log: EventLog,
    nats_server: object,
    logs_dir: Path,
) -> None:
    presence_replicas.start(2)
    url = nats_server.url  # type: ignore[attr-defined]
    doomed = await start_gateway(gateways, url, logs_dir, "gw-doomed")
    survivor = await start_gateway(gateways, url, logs_dir, "gw-survivor")
    await doomed.open(new_id(), "alice")
    await doomed.open(new_id(), "bob")
    await survivor.open(new_id(), "bob")
    await survivor.open(new_id(), "carol")
    await wait_until(
        lambda: (
            sorted(u for kind, u in event_log.events if kind == "online")
            == ["alice", "bob", "carol"]
        ),
        "everyone online",
    )

    killed_at = time.monotonic()
    await doomed.kill()
    await wait_until(
        lambda: event_log.of("alice") == ["online", "offline"],
        "alice offline after her gateway died",
        timeout=CRASH_BOUND + 2,
    )
    took = time.monotonic() - killed_at
    assert took <= CRASH_BOUND, f"offline after {took:.1f}s"
    # Bob still has a tab on the surviving gateway: no flapping.
    await wait_until(lambda: _eq(live_connections(nc, "bob"), None, size=1), "bob has one tab")
    assert event_log.of("bob") == ["online"]
    assert event_log.of("carol") == ["online"]
    assert await presence_client.who_all(nc) == ["bob", "carol"]


async def test_two_replicas_publish_exactly_one_event_per_transition_over_200_reports(
    nc: NATS,
    presence_replicas: PresenceReplicas,
    gateways: list[FakeGateway],
    event_log: EventLog,
    nats_server: object,
    logs_dir: Path,
) -> None:
    presence_replicas.start(2)
    url = nats_server.url  # type: ignore[attr-defined]
    gws = [
        await start_gateway(gateways, url, logs_dir, "gw-one"),
        await start_gateway(gateways, url, logs_dir, "gw-two"),
    ]
    rng = random.Random(7)
    users = [f"user{i}" for i in range(12)]
    # connection_id -> (gateway, user); the truth the script keeps.
    live: dict[str, tuple[FakeGateway, str]] = {}
    expected: dict[str, list[str]] = {user: [] for user in users}

    for _ in range(200):
        if live and rng.random() < 0.45:
            cid = rng.choice(sorted(live))
            gateway, user = live.pop(cid)
            await gateway.close(cid, user)
            if not any(u == user for _, u in live.values()):
                expected[user].append("offline")
        else:
            cid, gateway, user = new_id(), rng.choice(gws), rng.choice(users)
            if not any(u == user for _, u in live.values()):
                expected[user].append("online")
            live[cid] = (gateway, user)
            await gateway.open(cid, user)
        # Let this report land before the next, so the transitions presence sees are the
        # ones the script made (reports of one gateway on two subjects may be handled in
        # either order by two replicas; that case has its own test below).
        want = {c for c, (_, u) in live.items() if u == user}
        await wait_until(lambda u=user, w=want: _eq(live_connections(nc, u), w), "report landed")

    total = sum(len(kinds) for kinds in expected.values())
    await wait_until(lambda: len(event_log.events) >= total, f"{total} events")
    # Exactly: nothing late and duplicated after the sweeps had time to run.
    await _quiet_for(event_log, 2 * TEST_HEARTBEAT_INTERVAL)
    assert {user: event_log.of(user) for user in users} == expected
    stored = await nc.jetstream().stream_info(names.STREAM_PRESENCE)
    assert stored.state.messages == total


async def test_burst_of_reports_in_any_order_ends_true_without_duplicate_events(
    nc: NATS,
    presence_replicas: PresenceReplicas,
    gateways: list[FakeGateway],
    event_log: EventLog,
    nats_server: object,
    logs_dir: Path,
) -> None:
    presence_replicas.start(2)
    url = nats_server.url  # type: ignore[attr-defined]
    gws = [
        await start_gateway(gateways, url, logs_dir, "gw-x"),
        await start_gateway(gateways, url, logs_dir, "gw-y"),
    ]
    rng = random.Random(11)
    users = [f"burst{i}" for i in range(8)]
    live: dict[str, tuple[FakeGateway, str]] = {}
    for _ in range(200):  # no waiting: opens and closes race across two replicas
        if live and rng.random() < 0.45:
            cid = rng.choice(sorted(live))
            gateway, user = live.pop(cid)
            await gateway.close(cid, user)
        else:
            cid, gateway, user = new_id(), rng.choice(gws), rng.choice(users)
            live[cid] = (gateway, user)
            await gateway.open(cid, user)

    online = sorted({u for _, u in live.values()})
    truth = {u: u in online for u in users}
    try:
        await wait_until(lambda: _final_states(event_log, users) == truth, "events settle")
    except AssertionError:
        kv = {u: await live_connections(nc, u) for u in users}
        want = {u: {c for c, (_, w) in live.items() if w == u} for u in users}
        raise AssertionError((_final_states(event_log, users), truth, kv, want)) from None
    await _quiet_for(event_log, 2 * TEST_HEARTBEAT_INTERVAL)
    assert len(set(event_log.ids)) == len(event_log.ids), "an event was delivered twice"
    for user in users:
        kinds = event_log.of(user)
        assert all(a != b for a, b in itertools.pairwise(kinds)), (user, " ".join(kinds))
        assert not kinds or kinds[0] == "online", (user, kinds)
    assert await presence_client.who_all(nc) == online


async def test_restarting_presence_mid_run_loses_nothing_and_reannounces_nothing(
    nc: NATS,
    presence_replicas: PresenceReplicas,
    gateways: list[FakeGateway],
    event_log: EventLog,
    nats_server: object,
    logs_dir: Path,
) -> None:
    (replica,) = presence_replicas.start(1)
    gw = await start_gateway(gateways, nats_server.url, logs_dir, "gw-r")  # type: ignore[attr-defined]
    steady, leaving, arriving = new_id(), new_id(), new_id()
    await gw.open(steady, "steady")
    await gw.open(leaving, "leaving")
    await wait_until(lambda: len(event_log.events) == 2, "two online")

    replica.kill()  # SIGKILL: whatever was in flight is lost with it
    # While no presence runs: one user leaves, one arrives; those reports reach nobody.
    await gw.close(leaving, "leaving")
    await gw.open(arriving, "arriving")
    replica.start()

    # The heartbeat (the gateway's full list) repairs both; nothing else changes.
    await wait_until(
        lambda: (
            event_log.of("leaving") == ["online", "offline"]
            and event_log.of("arriving") == ["online"]
        ),
        "missed reports repaired from heartbeats",
    )
    await _quiet_for(event_log, TEST_GATEWAY_EXPIRY + 1)
    assert event_log.of("steady") == ["online"]
    assert await presence_client.who_all(nc) == ["arriving", "steady"]


async def test_who_is_online_pages_through_everyone_in_name_order(
    nc: NATS,
    presence_replicas: PresenceReplicas,
    gateways: list[FakeGateway],
    event_log: EventLog,
    nats_server: object,
    logs_dir: Path,
) -> None:
    presence_replicas.start(2)
    gw = await start_gateway(gateways, nats_server.url, logs_dir, "gw-who")  # type: ignore[attr-defined]
    users = [f"u{i:03d}" for i in range(25)]
    for user in reversed(users):
        await gw.open(new_id(), user)
    await wait_until(lambda: len(event_log.events) == 25, "all online")
    await wait_until(lambda: _who_total(nc, 25), "every replica sees all 25", timeout=5)

    pages = []
    after = ""
    while True:
        page = await presence_client.who(nc, after=after, limit=10)
        assert page.total == 25
        pages.append(page.users)
        if not page.next_after:
            break
        after = page.next_after
    assert pages == [users[:10], users[10:20], users[20:]]
    assert await presence_client.who_all(nc) == users


async def test_who_answers_a_bad_request_with_a_400_service_error(
    nc: NATS, presence_replicas: PresenceReplicas
) -> None:
    presence_replicas.start(1)
    reply = await nc.request(names.PRESENCE_WHO, b"\xff\xff\xff", timeout=2)
    assert (reply.headers or {}).get("Nats-Service-Error-Code") == "400"
    with pytest.raises(presence_client.PresenceUnavailable):
        await presence_client.who(nc, after="x" * 100)


async def test_who_is_a_discoverable_micro_service_and_metrics_count_users(
    nc: NATS,
    presence_replicas: PresenceReplicas,
    gateways: list[FakeGateway],
    event_log: EventLog,
    nats_server: object,
    logs_dir: Path,
) -> None:
    (replica,) = presence_replicas.start(1)
    info_reply = await nc.request(f"$SRV.INFO.{names.SERVICE_PRESENCE}", b"", timeout=2)
    info = __import__("json").loads(info_reply.data)
    assert info["name"] == names.SERVICE_PRESENCE
    assert [e["subject"] for e in info["endpoints"]] == [names.PRESENCE_WHO]
    assert info["endpoints"][0]["queue_group"] == names.QUEUE_PRESENCE

    gw = await start_gateway(gateways, nats_server.url, logs_dir, "gw-m")  # type: ignore[attr-defined]
    await gw.open(new_id(), "dave")
    await wait_until(lambda: event_log.of("dave") == ["online"], "dave online")
    metrics = await wait_until(
        lambda: _metrics_show(replica.http_port, "presence_online_users 1.0"), "metrics"
    )
    assert 'presence_events_total{kind="online"} 1.0' in str(metrics)
    assert "presence_heartbeat_lag_seconds_count" in str(metrics)


async def test_presence_shuts_down_cleanly_on_sigterm(presence_replicas: PresenceReplicas) -> None:
    (replica,) = presence_replicas.start(1)
    assert replica.terminate(15) == 0


async def test_undecodable_report_is_dropped_and_presence_goes_on(
    nc: NATS,
    presence_replicas: PresenceReplicas,
    event_log: EventLog,
) -> None:
    presence_replicas.start(1)
    await nc.publish(names.PRESENCE_CONN_OPENED, b"\xff\x00garbage")
    payload, headers = codec.encode(
        pb.ConnectionOpened(gateway_id="gw-z", connection_id="c1", user="Not Valid!", ts_ms=1)
    )
    await nc.publish(names.PRESENCE_CONN_OPENED, payload, headers=headers)
    payload, headers = codec.encode(
        pb.ConnectionOpened(gateway_id="gw-z", connection_id="c2", user="erin", ts_ms=1)
    )
    await nc.publish(names.PRESENCE_CONN_OPENED, payload, headers=headers)
    await wait_until(lambda: event_log.events == [("online", "erin")], "erin online")


# --- helpers ---------------------------------------------------------------------------
async def _eq(got: object, want: set[str] | None, size: int | None = None) -> bool:
    value = await got  # type: ignore[misc]
    if size is not None:
        return len(value) == size
    return bool(value == want)


async def _quiet_for(log: EventLog, seconds: float) -> None:
    """Wait until no new event arrived for `seconds` (a settled system, not a sleep)."""
    seen = [len(log.events), time.monotonic()]

    def settled() -> bool:
        if len(log.events) != seen[0]:
            seen[0], seen[1] = len(log.events), time.monotonic()
        return time.monotonic() - seen[1] >= seconds

    await wait_until(settled, f"no new presence events for {seconds}s", timeout=seconds * 4)


def _final_states(log: EventLog, users: list[str]) -> dict[str, bool]:
    return {u: (log.of(u) or ["offline"])[-1] == "online" for u in users}


async def _who_total(nc: NATS, total: int) -> bool:
    for _ in range(6):  # the queue group spreads requests: ask each replica a few times
        if (await presence_client.who(nc, limit=1)).total != total:
            return False
    return True


def _metrics_show(port: int, line: str) -> str | None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return text if line in text else None
