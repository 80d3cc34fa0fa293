"""The system under test as processes: NATS, Postgres, services, baseline servers.

Everything runs on free ports with its data in a temporary folder, and is stopped (in
reverse order) when the `Cluster` context ends. A service whose package is not there yet
raises `Missing`, so the scenario that needs it is skipped rather than failed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import jwt
import psutil

from devtools.processes import ServiceProcess
from devtools.servers import NatsServer, PostgresServer, free_port, wait_for_port

BENCH_SECRET = "bench-only-guest-secret-not-for-production"
# Each service in its own session, like NATS (devtools.servers): with the kernel's
# autogroup scheduling (Linux's default) the CPU is shared per session, so services in the
# bench's session would share ONE share with the load generator on a busy machine, while
# in production each has its own container. BENCH_OWN_SESSIONS=0: the old way.
OWN_SESSIONS = os.environ.get("BENCH_OWN_SESSIONS", "1") != "0"
GUEST_ISSUER = "natschat-guest"


class Missing(Exception):
    """A service this scenario needs has no entry point yet."""


def service_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    except ModuleNotFoundError:
        return False


def mint_token(user: str, secret: str = BENCH_SECRET, ttl: float = 3600.0) -> str:
    """A guest token exactly as the gateway issues them (HS256, sub, iss, exp, and jti: the
    name reservation; one per bench user, which the gateway takes on its first hello)."""
    now = int(time.time())
    claims = {"sub": user, "iss": GUEST_ISSUER, "iat": now, "exp": now + int(ttl),
              "jti": f"bench-{user}"}  # fmt: skip
    return jwt.encode(claims, secret, algorithm="HS256")


class Proc:
    """A process we started (service or baseline), with its psutil handle for CPU/RSS."""

    def __init__(self, name: str, pid: int, port: int) -> None:
        self.name = name
        self.pid = pid
        self.port = port
        self.ps = psutil.Process(pid)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)


class Cluster:
    def __init__(self, workdir: Path, gateway_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.gateway_env = gateway_env or {}
        self.nats: NatsServer | None = None
        self.pg: PostgresServer | None = None
        self.database_url = ""
        self.services: list[tuple[ServiceProcess, Proc]] = []
        self.baselines: list[tuple[subprocess.Popen[bytes], Proc]] = []
        self._count = 0

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- servers ----------------------------------------------------------------------
    def start_nats(self) -> str:
        if self.nats is None:
            self.nats = NatsServer(self.workdir / "nats").start()
        return self.nats.url

    def start_postgres(self) -> str:
        if self.pg is None:
            self.pg = PostgresServer(self.workdir / "pg").start()
            self.database_url = asyncio.run(_ensure_database(self.pg.url, "chat"))
        return self.database_url

    # --- services ---------------------------------------------------------------------
    def _start(
        self, module: str, env: dict[str, str], port: int, wait: bool = True
    ) -> tuple[ServiceProcess, Proc]:
        if not service_exists(module):
            raise Missing(f"services/{module} has no __main__ yet")
        self._count += 1
        log = self.logs / f"{module}-{self._count}.log"
        sp = ServiceProcess(module, env, port, log, own_session=OWN_SESSIONS)
        sp.start(wait_ready=wait, timeout=60)
        entry = (sp, Proc(f"{module}-{self._count}", sp.pid, port))
        self.services.append(entry)
        return entry

    def gateway(
        self, instance: str, extra: dict[str, str] | None = None
    ) -> tuple[ServiceProcess, Proc]:
        port = free_port()
        env = {
            "GATEWAY_NATS_SERVERS": self.start_nats(),
            "GATEWAY_HTTP_PORT": str(port),
            "GATEWAY_HTTP_HOST": "127.0.0.1",
            "GATEWAY_INSTANCE_ID": instance,
            "GATEWAY_GUEST_SECRET": BENCH_SECRET,
            "GATEWAY_RATE_PER_SECOND": "1000000",
            "GATEWAY_RATE_BURST": "1000000",
            "GATEWAY_READ_RATE_PER_SECOND": "1000000",
            "GATEWAY_READ_RATE_BURST": "1000000",
            "GATEWAY_LOG_LEVEL": "WARNING",
            **self.gateway_env,
            **(extra or {}),
        }
        return self._start("gateway", env, port)

    def presence(self, extra: dict[str, str] | None = None) -> tuple[ServiceProcess, Proc]:
        port = free_port()
        env = {
            "PRESENCE_NATS_SERVERS": self.start_nats(),
            "PRESENCE_HTTP_PORT": str(port),
            "PRESENCE_HTTP_HOST": "127.0.0.1",
            "PRESENCE_LOG_LEVEL": "WARNING",
            **(extra or {}),
        }
        return self._start("presence", env, port)

    def archive(self, wait: bool = True) -> tuple[ServiceProcess, Proc]:
        port = free_port()
        env = {
            "ARCHIVE_NATS_SERVERS": self.start_nats(),
            "ARCHIVE_DATABASE_URL": self.start_postgres(),
            "ARCHIVE_HTTP_PORT": str(port),
            "ARCHIVE_HTTP_HOST": "127.0.0.1",
            "ARCHIVE_LOG_LEVEL": "WARNING",
        }
        return self._start("archive", env, port, wait)

    def rpc(self) -> tuple[ServiceProcess, Proc, str]:
        """An rpc replica with no rate limits; also returns its gRPC address."""
        port, grpc_port = free_port(), free_port()
        env = {
            "RPC_NATS_SERVERS": self.start_nats(),
            "RPC_HTTP_PORT": str(port),
            "RPC_HTTP_HOST": "127.0.0.1",
            "RPC_GRPC_HOST": "127.0.0.1",
            "RPC_GRPC_PORT": str(grpc_port),
            "RPC_GUEST_SECRET": BENCH_SECRET,
            "RPC_RATE_PER_SECOND": "1000000",
            "RPC_RATE_BURST": "1000000",
            "RPC_READ_RATE_PER_SECOND": "1000000",
            "RPC_READ_RATE_BURST": "1000000",
            "RPC_STREAM_BUFFER": "100000",
            "RPC_LOG_LEVEL": "WARNING",
        }
        sp, proc = self._start("rpc", env, port)
        return sp, proc, f"127.0.0.1:{grpc_port}"

    def baseline(self) -> Proc:
        port = free_port()
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"baseline-{port}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.bench.baseline", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(port, proc=proc)
        entry = Proc(f"baseline-{len(self.baselines) + 1}", proc.pid, port)
        self.baselines.append((proc, entry))
        return entry

    def stop_service(self, sp: ServiceProcess, kill: bool = False) -> None:
        if kill:
            sp.kill()
        else:
            sp.terminate()
        self.services = [e for e in self.services if e[0] is not sp]

    def close(self) -> None:
        for sp, _ in reversed(self.services):
            sp.terminate(timeout=15)
        self.services = []
        for proc, _ in self.baselines:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.baselines = []
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if self.pg is not None:
            self.pg.stop()
            self.pg = None


async def _ensure_database(server_url: str, name: str) -> str:
    conn = await asyncpg.connect(server_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def cpu_of(procs: list[Proc]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in procs:
        try:
            out[p.name] = p.cpu()
        except psutil.Error:
            out[p.name] = 0.0
    return out


def nats_proc(cluster: Cluster) -> Proc | None:
    if cluster.nats is None or cluster.nats.proc is None:
        return None
    return Proc("nats-server", cluster.nats.proc.pid, cluster.nats.port)
