"""/healthz, /readyz and Prometheus /metrics for services that have no web framework.

The gateway serves the same three paths from FastAPI using `probe_response`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

HEALTH_PATHS = ("/healthz", "/readyz", "/metrics")


def probe_response(
    path: str, ready: Callable[[], bool], alive: Callable[[], bool] = lambda: True
) -> tuple[int, str, bytes]:
    """(status, content type, body) for one of HEALTH_PATHS; 404 for anything else."""
    if path == "/healthz":
        # Alive means the event loop answers and no background task the service needs
        # has died (chatlib.tasks); NATS or Postgres outages are for /readyz to report,
        # since restarting the process would not bring them back.
        if not alive():
            return 503, "text/plain", b"failed\n"
        return 200, "text/plain", b"ok\n"
    if path == "/readyz":
        ok = ready()
        return (200 if ok else 503), "text/plain", b"ready\n" if ok else b"not ready\n"
    if path == "/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest()
    return 404, "text/plain", b"not found\n"


class HealthServer:
    """A minimal HTTP/1.1 server for the three probe paths."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self.host, self.port, self.ready, self.alive = host, port, ready, alive
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("health endpoints on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            status, ctype, body = probe_response(path, self.ready, self.alive)
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
