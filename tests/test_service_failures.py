"""Services never fail silently and always stop cleanly.

- The archive facing a database it cannot use (missing database 3D000, wrong password
  28P01, unknown role 28000) logs the SQLSTATE as an error, stays not ready and keeps
  retrying, so it starts working once an operator fixes it.
- A background task a service needs that dies is logged and fails /healthz, so the
  orchestrator restarts the container rather than leave a process that does nothing.
- SIGTERM while NATS is down still exits 0, after closing the pools.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from chatlib.health import HealthServer
from chatlib.tasks import CriticalTasks
from devtools.processes import ServiceProcess
from devtools.servers import NatsServer, PostgresServer, free_port, url_as

from tests import archive_fixtures
from tests.archive_fixtures import ArchiveProc, start_archive
from tests.gateway_fixtures import start_gateways
from tests.waiting import wait_until

archive_procs = archive_fixtures.archive_procs  # the fixture, under its name in this module


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def logged(proc: ServiceProcess, text: str) -> bool:
    return proc.log_file.exists() and text in proc.log_file.read_text()


async def refused_and_waiting(proc: ArchiveProc, sqlstate: str) -> None:
    """Logged as an error with the SQLSTATE, alive, not ready, and still retrying."""
    what = f"archive logs SQLSTATE {sqlstate}"
    await wait_until(lambda: logged(proc, f"SQLSTATE {sqlstate}"), what, timeout=20)
    assert status(proc.http_port, "/healthz") == 200
    assert status(proc.http_port, "/readyz") == 503
    assert proc.proc is not None and proc.proc.poll() is None
    first = proc.log_file.read_text().count(f"SQLSTATE {sqlstate}")
    await wait_until(
        lambda: proc.log_file.read_text().count(f"SQLSTATE {sqlstate}") > first,
        "the archive retries",
        timeout=20,
    )


async def test_a_missing_database_is_logged_and_the_archive_starts_once_it_exists(
    nats_server: Any, nc: Any, database_url: str, logs_dir: Path, archive_procs: list[ArchiveProc]
) -> None:
    missing = f"{database_url.rsplit('/', 1)[0]}/missing_{uuid.uuid4().hex[:8]}"
    try:
        proc = start_archive(archive_procs, nats_server.url, missing, logs_dir, wait_ready=False)
        await refused_and_waiting(proc, "3D000")
        admin = await asyncpg.connect(database_url)
        await admin.execute(f'CREATE DATABASE "{missing.rsplit("/", 1)[1]}"')
        await admin.close()
        await wait_until(lambda: status(proc.http_port, "/readyz") == 200, "ready", timeout=30)
    finally:
        for proc in archive_procs:
            proc.kill()
        admin = await asyncpg.connect(database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{missing.rsplit("/", 1)[1]}" WITH (FORCE)')
        await admin.close()


async def test_an_unknown_role_is_logged_with_its_sqlstate(
    nats_server: Any, nc: Any, database_url: str, logs_dir: Path, archive_procs: list[ArchiveProc]
) -> None:
    base, name = database_url.rsplit("/", 1)
    nobody = base.replace("postgres@", "nobody_here@", 1) + "/" + name
    proc = start_archive(archive_procs, nats_server.url, nobody, logs_dir, wait_ready=False)
    await refused_and_waiting(proc, "28000")


async def test_a_wrong_password_is_logged_with_its_sqlstate(
    pg_server: Any,
    nats_server: Any,
    nc: Any,
    database_url: str,
    logs_dir: Path,
    archive_procs: list[ArchiveProc],
) -> None:
    if not isinstance(pg_server, PostgresServer):
        pytest.skip("needs the embedded Postgres: the test adds a password rule to pg_hba")
    role = f"pw_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server.url)
    hba = Path(await admin.fetchval("SHOW hba_file"))
    original = await asyncio.to_thread(hba.read_text)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'right'")
        # First matching line wins: this role must give a password; everyone else trusts.
        rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
        await asyncio.to_thread(hba.write_text, rule + original)
        await admin.execute("SELECT pg_reload_conf()")
        base, name = database_url.rsplit("/", 1)
        wrong = base.replace("postgres@", f"{role}:wrong@", 1) + "/" + name
        proc = start_archive(archive_procs, nats_server.url, wrong, logs_dir, wait_ready=False)
        await refused_and_waiting(proc, "28P01")
        proc.kill()
    finally:
        await asyncio.to_thread(hba.write_text, original)
        await admin.execute("SELECT pg_reload_conf()")
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_a_dead_background_task_is_logged_and_fails_healthz(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = CriticalTasks()
    port = free_port()
    health = HealthServer("127.0.0.1", port, ready=lambda: True, alive=tasks.alive)
    await health.start()
    try:
        assert await asyncio.to_thread(status, port, "/healthz") == 200

        async def consume() -> None:
            raise RuntimeError("something nobody expected")

        task = tasks.spawn(consume(), name="archive-consume")
        await asyncio.wait({task})
        assert await asyncio.to_thread(status, port, "/healthz") == 503
        assert "archive-consume" in caplog.text and "something nobody expected" in caplog.text
        # A cancelled task (a stop) is not a failure.
        calm = CriticalTasks()
        sleeper = calm.spawn(asyncio.sleep(60), name="sleeper")
        await calm.stop()
        assert sleeper.cancelled() and calm.alive()
    finally:
        await health.stop()


async def test_sigterm_while_nats_is_down_exits_0_for_every_service(
    tmp_path: Path, database_url: str, logs_dir: Path, archive_procs: list[ArchiveProc]
) -> None:
    nats = await asyncio.to_thread(NatsServer.deployed(tmp_path / "nats").start)
    procs: list[ServiceProcess] = []
    try:
        archive = start_archive(archive_procs, nats.url, database_url, logs_dir)
        port = free_port()
        presence_env = {
            "PRESENCE_NATS_SERVERS": url_as(nats.url, "presence"),
            "PRESENCE_HTTP_PORT": str(port),
            "PRESENCE_HTTP_HOST": "127.0.0.1",
            "PRESENCE_DRAIN_TIMEOUT": "2",
        }
        presence = ServiceProcess("presence", presence_env, port, logs_dir / "presence.log")
        procs.append(presence.start())
        with start_gateways(nats.url, logs_dir, count=1) as gateways:
            gateway = gateways[0].proc
            await asyncio.to_thread(nats.kill)
            for proc in (archive, presence, gateway):
                name = proc.module
                await wait_until(lambda p=proc: p.probe("/readyz") == 503, f"{name} not ready")
                code = await asyncio.to_thread(proc.terminate, 30)
                log = proc.log_file.read_text()
                assert code == 0, f"{name} exited {code}:\n{log[-3000:]}"
                assert "Traceback" not in log, log[-3000:]
                assert f"{name} stopped" in log
    finally:
        for proc in procs:
            proc.kill()
        await asyncio.to_thread(nats.stop)


async def test_an_idle_archive_stops_promptly(
    nats_server: Any, nc: Any, database_url: str, logs_dir: Path, archive_procs: list[ArchiveProc]
) -> None:
    """Its pull request waiting on an empty queue must not hold the stop for the whole
    drain timeout (compose and Kubernetes wait on it)."""
    proc = start_archive(
        archive_procs, nats_server.url, database_url, logs_dir, ARCHIVE_DRAIN_TIMEOUT="10"
    )
    started = time.monotonic()
    assert await asyncio.to_thread(proc.terminate, 30) == 0
    took = time.monotonic() - started
    assert took < 5, f"an idle archive took {took:.1f}s to stop"
