"""Stream provisioning's retry rules: the busy-store rule in pure logic (a stand-in for
js.add_stream), and a JetStream that answers too late, on a real server behind a proxy."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats
import pytest
from chatlib import names, nats_wiring
from chatlib.settings import CommonSettings
from devtools.servers import NatsServer
from nats.js import api
from nats.js.errors import BadRequestError, ServerError

from tests.tcp_proxy import TcpProxy
from tests.waiting import wait_until

CONFIG = api.StreamConfig(name="S", subjects=["s.>"])


class FlakyStreams:
    """add_stream fails with the given errors, in order, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def add_stream(self, config: api.StreamConfig) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


def store_busy() -> ServerError:
    return ServerError(code=500, err_code=10049, description="error creating store for stream")


async def test_a_busy_store_is_retried_until_the_stream_is_created() -> None:
    js = FlakyStreams(store_busy(), store_busy())
    await nats_wiring.ensure_stream(js, CONFIG)  # type: ignore[arg-type]
    assert js.calls == 3


async def test_a_store_that_stays_busy_fails_after_the_retries() -> None:
    js = FlakyStreams(*[store_busy() for _ in range(nats_wiring.STORE_RETRIES + 1)])
    with pytest.raises(ServerError):
        await nats_wiring.ensure_stream(js, CONFIG)  # type: ignore[arg-type]
    assert js.calls == nats_wiring.STORE_RETRIES + 1


async def test_other_server_errors_are_not_retried() -> None:
    js = FlakyStreams(ServerError(code=500, err_code=10077, description="insufficient resources"))
    with pytest.raises(ServerError):
        await nats_wiring.ensure_stream(js, CONFIG)  # type: ignore[arg-type]
    assert js.calls == 1


async def test_a_stream_existing_with_another_config_is_left_alone() -> None:
    js = FlakyStreams(BadRequestError(code=400, err_code=10058, description="name in use"))
    await nats_wiring.ensure_stream(js, CONFIG)  # type: ignore[arg-type]
    assert js.calls == 1


async def test_provisioning_asks_again_when_jetstream_answers_too_late(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A cluster that has just elected its meta leader can take longer than a request's
    timeout to place replicated streams: a service starting then must wait, not exit."""
    proxy = TcpProxy(nats_server.port).start()
    url = nats_server.url.replace(f":{nats_server.port}", f":{proxy.port}")
    client = await nats.connect(url)
    try:
        js = client.jetstream(timeout=0.5)
        await asyncio.to_thread(proxy.stall)
        caplog.set_level(logging.WARNING, logger="chatlib.nats_wiring")
        task = asyncio.create_task(nats_wiring.provision(js, CommonSettings()))
        await wait_until(lambda: "asking again" in caplog.text, "a request timed out")
        assert not task.done()
        await asyncio.to_thread(proxy.set_pass)
        await asyncio.wait_for(task, 30)
        assert (await js.stream_info(names.STREAM_CHAT)).config.name == names.STREAM_CHAT
    finally:
        await client.close()
        proxy.stop()
