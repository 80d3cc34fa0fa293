"""The gateway's side of presence, through chatlib.presence_client: report connections
opened/closed (plus heartbeats) and ask who is online. Presence being down never fails a
socket: `who` answers None and the client is told presence_unavailable."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

from nats.aio.client import Client as NATS

from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class PresenceLink:
    def __init__(self, nc: NATS, gateway_id: str, settings: GatewaySettings) -> None:
        self.nc = nc
        self.gateway_id = gateway_id
        self.settings = settings
        self._reporter: Any = None
        self._client: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        try:
            from chatlib import presence_client  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            log.warning("chatlib.presence_client missing: presence is not reported")
            return
        self._client = presence_client
        self._reporter = presence_client.PresenceReporter(
            self.nc, self.gateway_id, self.settings.heartbeat_interval
        )
        await _maybe_await(self._reporter.start())

    def opened(self, connection_id: str, user: str) -> None:
        if self._reporter is not None:
            self._spawn(self._reporter.opened(connection_id, user))

    def closed(self, connection_id: str, user: str) -> None:
        if self._reporter is not None:
            self._spawn(self._reporter.closed(connection_id, user))

    async def who(self) -> list[str] | None:
        """Everyone online, or None when presence cannot answer."""
        if self._client is None:
            return None
        try:
            users = await asyncio.wait_for(
                self._client.who_all(self.nc), self.settings.request_timeout
            )
        except Exception as exc:  # PresenceUnavailable, timeouts, NATS trouble
            log.info("who is online unavailable: %s", exc)
            return None
        return sorted(users)

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._reporter is not None:
            await _maybe_await(self._reporter.stop())

    def _spawn(self, result: object) -> None:
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _maybe_await(result: object) -> None:
    if inspect.isawaitable(result):
        await result
