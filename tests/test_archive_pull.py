"""archive.pull.BatchPuller against a real NATS, side by side with nats-py's
PullSubscription.fetch, whose requests it makes: same batches, same order, same waiting."""

from __future__ import annotations

import asyncio

import pytest
from archive.pull import BatchPuller, PullError
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from tests.waiting import wait_until

STREAM = "PULLTEST"


async def make_consumers(js: JetStreamContext, *names: str) -> None:
    await js.add_stream(name=STREAM, subjects=["pulltest.>"], retention=api.RetentionPolicy.LIMITS)
    for name in names:
        await js.add_consumer(
            STREAM, api.ConsumerConfig(durable_name=name, ack_policy=api.AckPolicy.EXPLICIT)
        )


async def test_batches_are_those_of_nats_py_fetch(nc: NATS, js: JetStreamContext) -> None:
    await make_consumers(js, "library", "ours")
    for i in range(25):
        await js.publish(f"pulltest.{i % 3}", f"m{i}".encode(), headers={"Chat-Type": "x"})
    library = await js.pull_subscribe_bind(durable="library", stream=STREAM)
    puller = BatchPuller(nc, STREAM, "ours")
    await puller.start()
    try:
        for _ in range(3):
            theirs = await library.fetch(10, timeout=2)
            ours = await puller.fetch(10, 2)
            assert [(m.subject, m.data, m.headers) for m in ours] == [
                (m.subject, m.data, m.headers) for m in theirs
            ]
            assert [m.metadata.num_delivered for m in ours] == [1] * len(theirs)
            for msg in ours:
                await msg.ack()
        # Nothing left: nats-py raises a timeout, the puller says so with an empty batch.
        with pytest.raises(TimeoutError):
            await library.fetch(10, timeout=0.5)
        assert await puller.fetch(10, 0.5) == []
        info = await js.consumer_info(STREAM, "ours")
        assert info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        await puller.stop()


async def test_a_waiting_fetch_returns_what_arrives_meanwhile(
    nc: NATS, js: JetStreamContext
) -> None:
    await make_consumers(js, "ours")
    puller = BatchPuller(nc, STREAM, "ours")
    await puller.start()
    try:
        fetching = asyncio.create_task(puller.fetch(100, 10))

        async def request_waiting() -> bool:
            # The no-wait request found nothing; the one that waits is at the server.
            return (await js.consumer_info(STREAM, "ours")).num_waiting > 0

        await wait_until(request_waiting, "a waiting pull request", timeout=5)
        await js.publish("pulltest.late", b"late")
        # Back soon after the first message, not at the fetch's 10 s deadline: a quiet
        # system's message reaches history at once.
        msgs = await asyncio.wait_for(fetching, 5)
        assert [m.data for m in msgs] == [b"late"]
        # The request is still open at the server: what it delivers now is kept for the
        # next fetch, not lost (its ack timer runs).
        await js.publish("pulltest.later", b"later")
        await wait_until(lambda: bool(puller.held), "the late reply held", timeout=5)
        again = await puller.fetch(100, 10)
        assert [m.data for m in again] == [b"later"]
        for msg in [*msgs, *again]:
            await msg.ack()
    finally:
        await puller.stop()


async def test_an_error_status_is_raised_not_taken_for_an_empty_queue(
    nc: NATS, js: JetStreamContext
) -> None:
    await make_consumers(js)
    puller = BatchPuller(nc, STREAM, "no-such-consumer")
    await puller.start()
    try:
        with pytest.raises(PullError):
            await puller.fetch(10, 2)
    finally:
        await puller.stop()
