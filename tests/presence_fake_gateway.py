"""A stand-in gateway for the presence tests: a real process that reports connections with
chatlib.presence_client.PresenceReporter, exactly as the gateway does, and can be
SIGKILLed for real.

    python tests/presence_fake_gateway.py <nats_url> <gateway_id> <heartbeat_interval>

Commands on stdin, one per line, each answered with "ok" on stdout once published:
    open <connection_id> <user>
    close <connection_id> <user>
    quit                          (stops the heartbeat, leaves connections unreported)
"""

from __future__ import annotations

import asyncio
import sys

import nats
from chatlib.presence_client import PresenceReporter


async def main(url: str, gateway_id: str, interval: float) -> None:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    reporter = PresenceReporter(nc, gateway_id, interval)
    await reporter.start()
    await nc.flush()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        command, connection_id, user = parts
        if command == "open":
            await reporter.opened(connection_id, user)
        elif command == "close":
            await reporter.closed(connection_id, user)
        await nc.flush()
        print("ok", flush=True)
    await reporter.stop()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
