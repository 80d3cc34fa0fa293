"""`make up`: the whole system on one machine, no Docker.

Starts an embedded NATS (JetStream, data in .data/nats) and Postgres (.data/pg) unless
NATS_URL / DATABASE_URL are given, then presence, archive, two gateways and the gRPC
service (rpc) as processes.
Ctrl-C (or SIGTERM) stops the services first (they drain), then the servers. Data stays
in .data/ for the next run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
from pathlib import Path

import asyncpg

from devtools.processes import ServiceProcess
from devtools.servers import NatsServer, PostgresServer

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("UP_DATA_DIR", ROOT / ".data"))
# Not the standard ports: this machine may already run NATS/Postgres there.
NATS_PORT = int(os.environ.get("UP_NATS_PORT", "14222"))
PG_PORT = int(os.environ.get("UP_PG_PORT", "15432"))
PRESENCE_PORT = int(os.environ.get("UP_PRESENCE_PORT", "8081"))
ARCHIVE_PORT = int(os.environ.get("UP_ARCHIVE_PORT", "8082"))
RPC_PORT = int(os.environ.get("UP_RPC_PORT", "8083"))  # its probes and metrics
GRPC_PORT = int(os.environ.get("UP_GRPC_PORT", "50051"))
GATEWAY_PORTS = [int(p) for p in os.environ.get("UP_GATEWAY_PORTS", "8000,8001").split(",")]


def exists(module: str) -> bool:
    return importlib.util.find_spec(f"{module}.__main__") is not None


async def ensure_database(server_url: str, name: str) -> str:
    conn = await asyncpg.connect(server_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def plan(nats_url: str, database_url: str) -> list[ServiceProcess]:
    logs = DATA / "logs"
    procs: list[ServiceProcess] = []
    if exists("presence"):
        env = {"PRESENCE_NATS_SERVERS": nats_url, "PRESENCE_HTTP_PORT": str(PRESENCE_PORT)}
        procs.append(ServiceProcess("presence", env, PRESENCE_PORT, logs / "presence.log"))
    if exists("archive"):
        env = {
            "ARCHIVE_NATS_SERVERS": nats_url,
            "ARCHIVE_HTTP_PORT": str(ARCHIVE_PORT),
            "ARCHIVE_DATABASE_URL": database_url,
        }
        procs.append(ServiceProcess("archive", env, ARCHIVE_PORT, logs / "archive.log"))
    if exists("gateway"):
        for i, port in enumerate(GATEWAY_PORTS):
            env = {
                "GATEWAY_NATS_SERVERS": nats_url,
                "GATEWAY_HTTP_PORT": str(port),
                "GATEWAY_INSTANCE_ID": f"gateway-{i + 1}",
            }
            procs.append(ServiceProcess("gateway", env, port, logs / f"gateway-{i + 1}.log"))
    if exists("rpc"):
        env = {
            "RPC_NATS_SERVERS": nats_url,
            "RPC_HTTP_PORT": str(RPC_PORT),
            "RPC_GRPC_PORT": str(GRPC_PORT),
        }
        procs.append(ServiceProcess("rpc", env, RPC_PORT, logs / "rpc.log"))
    return procs


def open_line(gateway_ports: list[int]) -> str:
    """What to open: the first gateway's URL, then the others' (one, two or more)."""
    urls = [f"http://localhost:{port}" for port in gateway_ports]
    if len(urls) == 1:
        return f"Open {urls[0]}"
    others = "other gateways" if len(urls) > 2 else "second gateway"
    return f"Open {urls[0]}  ({others}: {', '.join(urls[1:])})"


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    nats_server = pg_server = None
    procs: list[ServiceProcess] = []
    # Ctrl-C goes to the whole process group; the children handle it themselves, so we
    # only note it here and stop them in order below.
    stop = {"requested": False}

    def request_stop(*_: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        nats_url = os.environ.get("NATS_URL", "")
        if not nats_url:
            nats_server = NatsServer(DATA / "nats", port=NATS_PORT).start()
            nats_url = nats_server.url
        database_url = os.environ.get("DATABASE_URL", "")
        if not database_url:
            pg_server = PostgresServer(DATA / "pg", port=PG_PORT).start()
            database_url = asyncio.run(ensure_database(pg_server.url, "chat"))
        print(f"NATS      {nats_url}")
        print(f"Postgres  {database_url}")
        procs = plan(nats_url, database_url)
        for proc in procs:
            proc.start(wait_ready=False)
        for proc in procs:
            proc.wait_ready(60)
            print(f"{proc.module:<9} ready on :{proc.http_port}   log: {proc.log_file}")
        if any(p.module == "gateway" for p in procs):
            print(f"\n{open_line([p.http_port for p in procs if p.module == 'gateway'])}")
        if any(p.module == "rpc" for p in procs):
            grpcurl = f"grpcurl -plaintext localhost:{GRPC_PORT} list"
            print(f"gRPC      localhost:{GRPC_PORT}   ({grpcurl})")
        print(
            f"monitor   .venv/bin/chatctl --server {nats_url} stats   "
            f"(or, if you have the optional nats CLI: nats --server {nats_url} stream report)"
        )
        print("Ctrl-C stops everything.")
        while not stop["requested"]:
            signal.pause()
    except Exception as exc:
        print(f"make up failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    finally:
        print("\nstopping…")
        # Services first, so they drain into a NATS and Postgres that are still there.
        for proc in reversed(procs):
            proc.terminate()
        if nats_server:
            nats_server.stop()
        if pg_server:
            pg_server.stop()
        print("stopped.")


if __name__ == "__main__":
    main()
