"""`make up` brings up JetStream NATS, Postgres and the services; Ctrl-C stops all of it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import nats
import psutil
import pytest
from devtools.servers import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_LINE = "Ctrl-C stops everything."


def start_up(data_dir: Path, ports: dict[str, str]) -> subprocess.Popen[str]:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")},
        "UP_DATA_DIR": str(data_dir),
        **ports,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "devtools.up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # like a terminal: Ctrl-C goes to the whole group
    )


def read_until_ready(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if READY_LINE in line:
            return "".join(seen)
    raise AssertionError("make up never became ready:\n" + "".join(seen))


def ctrl_c(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(90)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def up_ports() -> Iterator[dict[str, str]]:
    yield {
        "UP_NATS_PORT": str(free_port()),
        "UP_PG_PORT": str(free_port()),
        "UP_PRESENCE_PORT": str(free_port()),
        "UP_ARCHIVE_PORT": str(free_port()),
        "UP_RPC_PORT": str(free_port()),
        "UP_GRPC_PORT": str(free_port()),
        "UP_GATEWAY_PORTS": f"{free_port()},{free_port()}",
    }


async def test_make_up_runs_nats_and_postgres_and_ctrl_c_leaves_nothing_behind(
    tmp_path: Path, up_ports: dict[str, str]
) -> None:
    proc = start_up(tmp_path, up_ports)
    try:
        read_until_ready(proc)
        children = descendants(proc.pid)
        assert children, "make up started no processes"

        # The gRPC door is up too: its health service says SERVING.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{up_ports['UP_GRPC_PORT']}") as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING

        nc = await nats.connect(f"nats://127.0.0.1:{up_ports['UP_NATS_PORT']}")
        info = await nc.jetstream().account_info()
        assert info.limits is not None  # JetStream answers
        await nc.close()

        db = f"postgresql://postgres@127.0.0.1:{up_ports['UP_PG_PORT']}/chat"
        conn = await asyncpg.connect(db)
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (v text)")
        await conn.execute("INSERT INTO kept VALUES ('from the first run')")
        await conn.close()
    finally:
        ctrl_c(proc)
    assert proc.returncode == 0
    assert all(not c.is_running() or c.status() == psutil.STATUS_ZOMBIE for c in children)

    # Data survives a restart of `make up`.
    proc = start_up(tmp_path, up_ports)
    try:
        read_until_ready(proc)
        conn = await asyncpg.connect(db)
        assert await conn.fetchval("SELECT v FROM kept") == "from the first run"
        await conn.close()
    finally:
        ctrl_c(proc)
    assert proc.returncode == 0


def test_ctrl_c_stops_the_services_before_the_servers_so_they_drain_cleanly(
    tmp_path: Path, up_ports: dict[str, str]
) -> None:
    """The terminal's SIGINT goes to the whole process group: the embedded NATS and Postgres
    must not get it, or they die while the services are still draining into them."""
    proc = start_up(tmp_path, up_ports)
    try:
        banner = read_until_ready(proc)
    finally:
        ctrl_c(proc)
    assert proc.returncode == 0
    # What `make up` prints is runnable here: chatctl, and the nats CLI only as an option.
    assert re.search(r"chatctl --server nats://\S+ stats", banner), banner
    assert "XDG_RUNTIME_DIR" not in banner
    logs = tmp_path / "logs"
    texts = {p.name: p.read_text(errors="replace") for p in logs.glob("*.log")}
    assert "archive.log" in texts and "presence.log" in texts
    for name, text in texts.items():
        for bad in ("drain failed", "connection reconnecting", "ConnectionDoesNotExistError"):
            assert bad not in text, f"{name}: {bad!r} after Ctrl-C:\n{text[-3000:]}"


@pytest.mark.parametrize("count", [1, 2, 3])
def test_make_up_plans_and_announces_one_gateway_per_port(count: int) -> None:
    """UP_GATEWAY_PORTS=8000 (one gateway) or three work: one process and URL per port."""
    from devtools import up

    ports = [18000 + i for i in range(count)]
    env = {**os.environ, "UP_GATEWAY_PORTS": ",".join(map(str, ports))}
    code = (
        "from devtools import up; "
        "procs = up.plan('nats://x', 'postgresql://x'); "
        "print([p.http_port for p in procs if p.module == 'gateway']); "
        "print(up.open_line(up.GATEWAY_PORTS))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    planned, line = result.stdout.splitlines()
    assert planned == str(ports)
    assert line.startswith(f"Open http://localhost:{ports[0]}")
    for port in ports:
        assert line.count(f"http://localhost:{port}") == 1
    assert up.open_line([8000]) == "Open http://localhost:8000"
