"""One way every service starts and stops.

start: connect to NATS (retrying), provision streams, start the service, serve probes.
stop (SIGTERM/SIGINT): stop intake -> finish in-flight work within drain_timeout ->
drain NATS -> close pools. The order matters and each step says why.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from chatlib import nats_wiring
from chatlib.health import HealthServer
from chatlib.logs import setup_logging
from chatlib.settings import CommonSettings

log = logging.getLogger(__name__)

# SIGTERM: what Kubernetes, compose and `make up` send to stop us.
# SIGINT: Ctrl-C in a terminal.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    name: str

    async def start(self, nc: NATS, js: JetStreamContext) -> None: ...

    async def stop_intake(self) -> None: ...

    async def finish_inflight(self) -> None: ...

    async def close(self) -> None: ...

    def ready(self) -> bool: ...

    def alive(self) -> bool: ...


async def serve(service: Service, settings: CommonSettings, stop: asyncio.Event) -> None:
    ident = nats_wiring.instance_id(settings, service.name)
    # A service that must act on a lost connection (the rpc service ends its streams so
    # clients resume from their last seq) says so with an on_nats_state method.
    nc = await nats_wiring.connect(settings, ident, getattr(service, "on_nats_state", None))
    js = nc.jetstream()
    await nats_wiring.provision(js, settings)
    await service.start(nc, js)
    health = HealthServer(settings.http_host, settings.http_port, service.ready, service.alive)
    await health.start()
    log.info("%s started", service.name, extra={"instance": ident})

    await stop.wait()
    log.info("%s stopping", service.name)
    try:
        # 1. Stop intake first so no new work starts while we wait for the old to finish.
        await service.stop_intake()
        # 2. Finish in-flight work (a batch being committed, a request being answered), but
        #    never longer than drain_timeout: the orchestrator kills us soon after anyway,
        #    and unacked work is redelivered to another replica.
        try:
            await asyncio.wait_for(service.finish_inflight(), settings.drain_timeout)
        except TimeoutError:
            log.warning("in-flight work not finished within %.1fs", settings.drain_timeout)
        # 3. Drain NATS: flushes pending publishes and acks, then closes the connection.
        await nats_wiring.close(nc, settings.drain_timeout)
    finally:
        # 4. Close pools last (the in-flight work above may still have needed them), and
        #    whatever went wrong above: NATS may be down, the database may be down.
        await service.close()
        await health.stop()
    log.info("%s stopped", service.name)


def run(service: Service, settings: CommonSettings) -> None:
    """Entry point body for presence and archive: run until SIGTERM/SIGINT."""
    setup_logging(service.name, settings.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        await serve(service, settings, stop)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# --- Helpers for services that run their own server (the gateway runs uvicorn) ---------
def stop_on_signals(stop: asyncio.Event) -> None:
    """Set `stop` on SIGTERM/SIGINT (call from inside the running loop)."""
    loop = asyncio.get_running_loop()
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, stop.set)


def run_main(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an async entry point on uvloop when available, like `run` does."""
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
