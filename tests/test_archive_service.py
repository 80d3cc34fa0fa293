"""The archive as real processes against real NATS and Postgres: exactly-once under load,
SIGKILL and a Postgres outage; poison tasks dead-lettered; history over nats micro."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from chatlib import codec, ids, names
from chatlib.proto.chat import v1 as pb
from devtools.servers import NatsServer, PostgresServer
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from tests import archive_fixtures
from tests.archive_fixtures import (
    ArchiveProc,
    provision,
    publish_chat,
    publish_tasks,
    room_message,
    row_count,
    row_ids,
    start_archive,
)
from tests.waiting import wait_until

archive_procs = archive_fixtures.archive_procs  # the fixture, under its name in this module


async def queue_is_drained(js: JetStreamContext) -> bool:
    """Every task acked: the work queue holds nothing and nothing is in flight."""
    stream = await js.stream_info(names.STREAM_ARCHIVE)
    consumer = await js.consumer_info(names.STREAM_ARCHIVE, names.CONSUMER_ARCHIVE)
    return stream.state.messages == 0 and consumer.num_ack_pending == 0


async def test_ten_thousand_tasks_through_two_replicas_make_exactly_ten_thousand_rows(
    nats_server: NatsServer,
    nc: NATS,
    js: JetStreamContext,
    database_url: str,
    logs_dir: Path,
    archive_procs: list[ArchiveProc],
) -> None:
    await provision(js)
    messages = [room_message(f"room-{i % 7}", i) for i in range(10_000)]
    replicas = [
        start_archive(archive_procs, nats_server.url, database_url, logs_dir, wait_ready=False)
        for _ in range(2)
    ]
    for replica in replicas:
        replica.wait_ready()
    # Half through CHAT (as the gateway publishes), half directly as archive tasks, and a
    # second publish of some of them: the duplicates are dropped or written once.
    await asyncio.gather(publish_chat(js, messages[:5000]), publish_tasks(js, messages[5000:]))
    await publish_tasks(js, messages[:500])

    async def all_written() -> bool:
        return await row_count(database_url) >= 10_000

    await wait_until(all_written, "10,000 rows", timeout=60, interval=0.2)
    await wait_until(lambda: queue_is_drained(js), "work queue drained", timeout=20)
    assert sorted(await row_ids(database_url)) == sorted(m.id for m in messages)
    # Messages sourced from CHAT keep their CHAT sequence; direct tasks have none.
    conn = await asyncpg.connect(database_url)
    try:
        sequenced = await conn.fetchval("SELECT count(*) FROM messages WHERE stream_seq > 0")
    finally:
        await conn.close()
    assert sequenced == 5000
    # Both replicas took a share of the work (one shared durable consumer).
    assert all(r.metric("archive_rows_written_total") > 0 for r in replicas)


async def test_sigkill_of_a_replica_mid_stream_loses_and_duplicates_nothing(
    nats_server: NatsServer,
    nc: NATS,
    js: JetStreamContext,
    database_url: str,
    logs_dir: Path,
    archive_procs: list[ArchiveProc],
) -> None:
    await provision(js)
    messages = [room_message("dev", i) for i in range(10_000)]
    await publish_tasks(js, messages)
    # Small batches so the victim is almost surely holding one when it dies.
    victim = start_archive(
        archive_procs, nats_server.url, database_url, logs_dir, ARCHIVE_BATCH_SIZE="50"
    )

    async def some_written() -> bool:
        return await row_count(database_url) > 500

    await wait_until(some_written, "the victim writes some rows", timeout=30, interval=0.01)
    victim.kill()
    assert await row_count(database_url) < 10_000, "the victim finished before it was killed"
    survivor = start_archive(archive_procs, nats_server.url, database_url, logs_dir)

    async def all_written() -> bool:
        return await row_count(database_url) >= 10_000

    await wait_until(all_written, "all rows after the kill", timeout=60, interval=0.2)
    await wait_until(lambda: queue_is_drained(js), "work queue drained", timeout=20)
    written = await row_ids(database_url)
    assert len(written) == len(set(written)) == 10_000
    assert set(written) == {m.id for m in messages}
    # The tasks the victim held unacked came back to the survivor.
    assert survivor.metric("archive_redeliveries_total") > 0


async def test_postgres_outage_loses_nothing_and_readiness_reports_it(
    nats_server: NatsServer,
    nc: NATS,
    js: JetStreamContext,
    pg_server: PostgresServer,
    database_url: str,
    logs_dir: Path,
    archive_procs: list[ArchiveProc],
) -> None:
    await provision(js)
    replica = start_archive(archive_procs, nats_server.url, database_url, logs_dir)
    before = [room_message("dev", i) for i in range(1000)]
    during = [room_message("dev", i) for i in range(1000, 3000)]
    await publish_chat(js, before)
    try:
        pg_server.stop()
        await publish_chat(js, during)  # NATS keeps taking messages: nothing is lost
        await wait_until(
            lambda: replica.probe("/readyz") == 503, "not ready while Postgres is down"
        )
    finally:
        pg_server.start()  # shared by the whole session: it must be running again

    async def all_written() -> bool:
        return await row_count(database_url) >= 3000

    await wait_until(all_written, "every row after Postgres returns", timeout=60, interval=0.2)
    await wait_until(lambda: queue_is_drained(js), "work queue drained", timeout=20)
    assert sorted(await row_ids(database_url)) == sorted(m.id for m in before + during)
    await wait_until(lambda: replica.probe("/readyz") == 200, "ready again")
    # Waiting out the outage did not burn deliveries: nothing went to the dead letters.
    assert replica.metric("archive_dead_lettered_total") == 0
    assert replica.metric("archive_db_unavailable_total") > 0  # it did hit the outage


async def test_poison_task_is_dead_lettered_with_its_reason_and_the_rest_flow(
    nats_server: NatsServer,
    nc: NATS,
    js: JetStreamContext,
    database_url: str,
    logs_dir: Path,
    archive_procs: list[ArchiveProc],
) -> None:
    await provision(js)
    good = [room_message("dev", i) for i in range(200)]
    await publish_tasks(js, good[:100])
    await js.publish(
        names.ARCHIVE_TASKS, b"\x0a\x10abc", headers={names.HEADER_TYPE: "chat.v1.ArchiveTask"}
    )
    nameless = pb.ChatMessage(id=ids.new_id(), room="dev", sender="bob", content="no id")
    nameless.id = ""
    data, headers = codec.encode(pb.ArchiveTask(message=nameless))
    await js.publish(names.ARCHIVE_TASKS, data, headers=headers)
    await publish_tasks(js, good[100:])
    replica = start_archive(archive_procs, nats_server.url, database_url, logs_dir)

    async def all_written() -> bool:
        return await row_count(database_url) >= 200

    await wait_until(all_written, "the good tasks are written", timeout=30, interval=0.1)
    await wait_until(lambda: queue_is_drained(js), "work queue drained (poison acked)")
    assert sorted(await row_ids(database_url)) == sorted(m.id for m in good)

    sub = await js.pull_subscribe(names.DEAD_LETTER_ARCHIVE, durable=None, stream=names.STREAM_DEAD)
    parked = await sub.fetch(10, timeout=2)
    reasons = sorted((m.headers or {})[names.HEADER_DEAD_REASON] for m in parked)
    assert len(parked) == 2
    assert "truncated" in reasons[1] and "bad message id" in reasons[0]
    assert all((m.headers or {})[names.HEADER_DEAD_SUBJECT] == names.ARCHIVE_TASKS for m in parked)
    assert replica.metric("archive_dead_lettered_total") == 2


async def history_request(
    nc: NATS, subject: str, request: pb.HistoryRequest
) -> tuple[str | None, pb.HistoryPage | None]:
    """(error code, page) for a request to the history micro service."""
    data, headers = codec.encode(request)
    reply = await nc.request(subject, data, headers=headers, timeout=5)
    code = (reply.headers or {}).get("Nats-Service-Error-Code")
    if code:
        return code, None
    return None, codec.decode_as(pb.HistoryPage, reply.data, reply.headers)


async def test_history_service_pages_rooms_and_guards_dm_threads(
    nats_server: NatsServer,
    nc: NATS,
    js: JetStreamContext,
    database_url: str,
    logs_dir: Path,
    archive_procs: list[ArchiveProc],
) -> None:
    await provision(js)
    for _ in range(2):
        start_archive(
            archive_procs, nats_server.url, database_url, logs_dir, ARCHIVE_HISTORY_PAGE_MAX="4"
        )
    room = [room_message("dev", i) for i in range(6)]
    dm = pb.ChatMessage(id=ids.new_id(), dm_peer="bob", sender="alice", content="psst", ts_ms=1)
    await publish_chat(js, room)
    data, headers = codec.encode(pb.ArchiveTask(message=dm))
    await js.publish(names.ARCHIVE_TASKS, data, headers=headers)

    async def all_written() -> bool:
        return await row_count(database_url) >= 7

    await wait_until(all_written, "messages archived", timeout=20)

    # Latest page, capped at 4, then the page before it.
    code, page = await history_request(
        nc, names.HISTORY_ROOM, pb.HistoryRequest(room="dev", requester="carol", limit=50)
    )
    assert code is None and page is not None
    assert [m.id for m in page.messages] == [m.id for m in room[2:]] and page.has_more
    code, page = await history_request(
        nc, names.HISTORY_ROOM, pb.HistoryRequest(room="dev", before_id=room[2].id, limit=4)
    )
    assert page is not None and [m.id for m in page.messages] == [m.id for m in room[:2]]
    assert not page.has_more

    # The DM thread: bob reads it, carol cannot page from it, bad requests are 400.
    code, page = await history_request(
        nc, names.HISTORY_DM, pb.HistoryRequest(dm_peer="alice", requester="bob")
    )
    assert page is not None and [m.content for m in page.messages] == ["psst"]
    code, _ = await history_request(
        nc, names.HISTORY_DM, pb.HistoryRequest(dm_peer="bob", requester="carol", before_id=dm.id)
    )
    assert code == "403"
    code, _ = await history_request(nc, names.HISTORY_DM, pb.HistoryRequest(dm_peer="bob"))
    assert code == "400"
    reply = await nc.request(names.HISTORY_ROOM, b"\x0a\x10abc", timeout=5)
    assert (reply.headers or {}).get("Nats-Service-Error-Code") == "400"

    # Both replicas are discoverable as one service.
    pings = await nc.request(f"$SRV.PING.{names.SERVICE_HISTORY}", b"", timeout=2)
    assert pings.data


async def test_sigterm_finishes_the_batch_in_hand_and_exits_cleanly(
    nats_server: NatsServer,
    nc: NATS,
    js: JetStreamContext,
    database_url: str,
    logs_dir: Path,
    archive_procs: list[ArchiveProc],
) -> None:
    await provision(js)
    messages = [room_message("dev", i) for i in range(3000)]
    await publish_tasks(js, messages)
    replica = start_archive(
        archive_procs, nats_server.url, database_url, logs_dir, ARCHIVE_BATCH_SIZE="100"
    )

    async def some_written() -> bool:
        return await row_count(database_url) > 0

    await wait_until(some_written, "some rows written", timeout=20, interval=0.01)
    assert await asyncio.to_thread(replica.terminate) == 0
    # Whatever was written was also acked: the queue holds exactly the rest, none in flight.
    written = await row_count(database_url)
    stream = await js.stream_info(names.STREAM_ARCHIVE)
    consumer = await js.consumer_info(names.STREAM_ARCHIVE, names.CONSUMER_ARCHIVE)
    assert consumer.num_ack_pending == 0
    assert stream.state.messages == 3000 - written


async def test_a_task_that_keeps_crashing_replicas_is_dead_lettered_not_stuck(
    nats_server: NatsServer,
    nc: NATS,
    js: JetStreamContext,
    database_url: str,
    logs_dir: Path,
    archive_procs: list[ArchiveProc],
) -> None:
    settings = {"ARCHIVE_MAX_DELIVER": "2", "ARCHIVE_ACK_WAIT": "2"}
    first = start_archive(archive_procs, nats_server.url, database_url, logs_dir, **settings)
    assert await asyncio.to_thread(first.terminate) == 0
    await publish_tasks(js, [room_message("dev", 1)])
    # Play the replicas that took the task and died before acking it, twice.
    crashing = await js.pull_subscribe_bind(
        durable=names.CONSUMER_ARCHIVE, stream=names.STREAM_ARCHIVE
    )
    assert len(await crashing.fetch(1, timeout=5)) == 1
    assert len(await crashing.fetch(1, timeout=10)) == 1  # redelivered after ack_wait
    await crashing.unsubscribe()
    replica = start_archive(archive_procs, nats_server.url, database_url, logs_dir, **settings)

    async def parked() -> int:
        return (await js.stream_info(names.STREAM_DEAD)).state.messages

    await wait_until(parked, "the exhausted task is dead-lettered", timeout=15)
    stream = await js.stream_info(names.STREAM_ARCHIVE)
    assert stream.state.messages == 0  # not stuck in the work queue
    sub = await js.pull_subscribe(names.DEAD_LETTER_ARCHIVE, durable=None, stream=names.STREAM_DEAD)
    [dead] = await sub.fetch(1, timeout=2)
    assert "never acked" in (dead.headers or {})[names.HEADER_DEAD_REASON]
    assert replica.metric("archive_dead_lettered_total") == 1
