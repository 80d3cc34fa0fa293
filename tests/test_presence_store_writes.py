"""presence.store.Store.update writes through the shared JetStream publisher: the same
outcomes as nats-py's kv.update (which it replaces), against real NATS."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from chatlib import names, nats_wiring
from chatlib.js_publisher import JetStreamPublisher
from chatlib.settings import CommonSettings
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from presence.mirror import Mirror
from presence.state import UserState, user_key
from presence.store import Store, now_ms


@pytest.fixture
async def kv(js: JetStreamContext) -> KeyValue:
    # The streams and buckets presence runs on (its events go to the PRESENCE stream).
    await nats_wiring.provision(js, CommonSettings())
    return await js.key_value(names.KV_PRESENCE)


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


async def test_a_user_whose_idle_key_was_collected_goes_online_again(
    stores: list[Store], kv: KeyValue
) -> None:
    """Collection leaves a delete marker as the key's last message: the next change must
    be written on the marker's revision, whether the mirror guessed "no key" or the key
    was read (a write on revision 0 would conflict until the change is given up)."""
    for i, store in enumerate(stores):
        user = f"user{i}"
        key = user_key(user)
        assert await store.mutate(user, lambda s: s.open("c1", "gw1", 1, now_ms()))
        assert await store.mutate(user, lambda s: s.close("c1", now_ms()))
        revision = (await kv.get(key)).revision
        await store.delete_if_unchanged(key, revision)
        for loaded in (False, True):
            store.mirror = Mirror()  # one that never saw the key: guesses, or reads
            store.mirror.loaded = loaded
            conn = f"c2{loaded}"
            opened = await store.mutate(user, lambda s, c=conn: s.open(c, "gw1", 2, now_ms()))
            assert opened, "the change was given up"
            state = UserState.decode((await kv.get(key)).value)
            assert conn in state.conns
            assert await store.mutate(user, lambda s, c=conn: s.close(c, now_ms()))
            await store.delete_if_unchanged(key, (await kv.get(key)).revision)
