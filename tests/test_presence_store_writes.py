"""presence.store.Store.update writes through the shared JetStream publisher: the same
outcomes as nats-py's kv.update (which it replaces), against real NATS."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from chatlib import names
from chatlib.js_publisher import JetStreamPublisher
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from presence.mirror import Mirror
from presence.store import Store


@pytest.fixture
async def kv(js: JetStreamContext) -> KeyValue:
    return await js.create_key_value(bucket=names.KV_PRESENCE, history=1)


@pytest.fixture
async def stores(nc: NATS, js: JetStreamContext, kv: KeyValue) -> AsyncIterator[list[Store]]:
    publisher = JetStreamPublisher(nc, timeout=2.0)
    await publisher.start()
    # Through the publisher, and the library's own kv.update (no publisher).
    yield [Store(js, kv, Mirror(), publisher), Store(js, kv, Mirror())]
    await publisher.stop()


async def test_an_update_lands_on_the_revision_it_names_as_kv_update_does(
    stores: list[Store], kv: KeyValue
) -> None:
    for i, store in enumerate(stores):
        key = f"u.user{i}"
        first = await store.update(key, b"one", 0)  # 0: create
        second = await store.update(key, b"two", first)
        entry = await kv.get(key)
        assert (entry.value, entry.revision) == (b"two", second)
        assert second > first


async def test_a_stale_revision_raises_wrong_last_sequence_as_kv_update_does(
    stores: list[Store], kv: KeyValue
) -> None:
    for i, store in enumerate(stores):
        key = f"u.user{i}"
        first = await store.update(key, b"one", 0)
        await kv.put(key, b"someone else")
        with pytest.raises(KeyWrongLastSequenceError):
            await store.update(key, b"two", first)
        with pytest.raises(KeyWrongLastSequenceError):  # a create of an existing key
            await store.update(key, b"two", 0)
        assert (await kv.get(key)).value == b"someone else"
