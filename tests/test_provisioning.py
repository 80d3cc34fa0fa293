"""Stream provisioning's retry rule (pure logic: a stand-in for js.add_stream)."""

from __future__ import annotations

from typing import Any

import pytest
from chatlib import nats_wiring
from nats.js import api
from nats.js.errors import BadRequestError, ServerError

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
