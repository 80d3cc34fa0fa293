"""The gateway's side of presence: report connections, heartbeat them, ask who is online.

The heartbeat lists every live connection of the gateway and is the source of truth;
opened/closed are the fast path (a clean close goes offline within a second). Presence
being down never blocks a gateway: reports are core publishes (fire and forget), and the
next heartbeat repairs anything presence missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats.errors
from nats.aio.client import Client as NATS
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from chatlib import codec, names, presence_wire
from chatlib.proto.chat import v1 as pb

log = logging.getLogger(__name__)

_OPENED = codec.type_name_of(pb.ConnectionOpened)
_CLOSED = codec.type_name_of(pb.ConnectionClosed)
# who_all stops after this many pages: a guard against a service that never ends paging.
WHO_ALL_MAX_PAGES = 10_000


class PresenceUnavailable(Exception):
    """Presence did not answer (timeout, no responders) or answered with an error."""


def now_ms() -> int:
    return int(time.time() * 1000)


class PresenceReporter:
    """Tracks one gateway's live connections and reports them to presence."""

    def __init__(self, nc: NATS, gateway_id: str, interval: float) -> None:
        self.nc = nc
        self.gateway_id = gateway_id
        self.interval = interval
        # connection_id -> user: what the heartbeat lists.
        self.connections: dict[str, str] = {}
        # connection_id -> its heartbeat entry, encoded once (presence_wire).
        self._entries: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            # Beat once right away so presence knows this gateway before its first socket.
            await self.beat()
            self._task = asyncio.create_task(self._loop(), name="presence-heartbeat")

    async def opened(self, connection_id: str, user: str) -> None:
        self.connections[connection_id] = user
        self._entries[connection_id] = presence_wire.encode_connection(connection_id, user)
        await self._report(names.PRESENCE_CONN_OPENED, _OPENED, connection_id, user)

    async def closed(self, connection_id: str, user: str) -> None:
        self.connections.pop(connection_id, None)
        self._entries.pop(connection_id, None)
        await self._report(names.PRESENCE_CONN_CLOSED, _CLOSED, connection_id, user)

    async def _report(self, subject: str, type_name: str, connection_id: str, user: str) -> None:
        # Byte for byte bytes(pb.ConnectionOpened / ConnectionClosed(...)) (presence_wire).
        payload = presence_wire.encode_connection_event(
            self.gateway_id, connection_id, user, now_ms()
        )
        try:
            await self.nc.publish(subject, payload, headers={names.HEADER_TYPE: type_name})
        except Exception as exc:  # NATS closed or buffer full: the heartbeat repairs it
            log.warning("presence report on %s failed: %s", subject, exc)

    async def beat(self) -> None:
        # Byte for byte bytes(pb.Heartbeat(...)), from the entries stored at open.
        payload = presence_wire.encode_heartbeat(
            self.gateway_id, list(self._entries.values()), now_ms()
        )
        headers = {names.HEADER_TYPE: codec.type_name_of(pb.Heartbeat)}
        try:
            await self.nc.publish(
                names.heartbeat_subject(self.gateway_id), payload, headers=headers
            )
        except Exception as exc:  # NATS closed or buffer full: the next beat repairs it
            log.warning("presence heartbeat failed: %s", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except Exception as exc:  # a closed or broken connection must not end the loop
                log.warning("presence heartbeat failed: %s", exc)


async def who(nc: NATS, after: str = "", limit: int = 1000, timeout: float = 2.0) -> pb.WhoPage:
    """One page of online users, sorted by name, starting after `after`."""
    payload, headers = codec.encode(pb.WhoRequest(after=after, limit=limit))
    try:
        reply = await nc.request(names.PRESENCE_WHO, payload, timeout=timeout, headers=headers)
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise PresenceUnavailable(f"presence did not answer: {exc!r}") from exc
    reply_headers = reply.headers or {}
    if ERROR_CODE_HEADER in reply_headers:
        raise PresenceUnavailable(
            f"presence error {reply_headers[ERROR_CODE_HEADER]}: "
            f"{reply_headers.get(ERROR_HEADER, '')}"
        )
    try:
        return codec.decode_as(pb.WhoPage, reply.data, reply_headers)
    except codec.DecodeError as exc:
        raise PresenceUnavailable(str(exc)) from exc


async def who_all(nc: NATS, timeout: float = 2.0) -> list[str]:
    """Everyone online, following pages."""
    users: list[str] = []
    after = ""
    for _ in range(WHO_ALL_MAX_PAGES):
        page = await who(nc, after=after, timeout=timeout)
        users.extend(page.users)
        if not page.next_after:
            return users
        after = page.next_after
    raise PresenceUnavailable("presence kept paging beyond the page limit")
