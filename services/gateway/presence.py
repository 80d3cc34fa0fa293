"""The gateway's side of presence, through chatlib.presence_client: report connections
opened/closed (plus heartbeats). Who is online is followed by gateway/roster.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from chatlib import presence_client
from nats.aio.client import Client as NATS

from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class PresenceLink:
    def __init__(self, nc: NATS, gateway_id: str, settings: GatewaySettings) -> None:
        self.nc = nc
        self.settings = settings
        self.reporter = presence_client.PresenceReporter(
            nc, gateway_id, settings.heartbeat_interval
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.reporter.start()

    def opened(self, connection_id: str, user: str) -> None:
        self._spawn(self.reporter.opened(connection_id, user))

    def closed(self, connection_id: str, user: str) -> None:
        self._spawn(self.reporter.closed(connection_id, user))

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.reporter.stop()

    def _spawn(self, report: Coroutine[Any, Any, None]) -> None:
        # Reports are fire-and-forget publishes; keep a reference until they finish.
        task = asyncio.ensure_future(report)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
