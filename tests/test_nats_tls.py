"""NATS with TLS and NKeys (deploy/nats/nats-tls.conf, certificates and keys from
`make certs`): the services work over it, and anyone without the right key, without TLS
or without trusting our CA is refused. The permissions are the same as with passwords:
tests/test_deploy_nats_permissions.py runs every check against both servers."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from chatlib import nats_wiring
from devtools import certs
from devtools import deploy_checks as dc
from devtools.processes import ServiceProcess
from devtools.servers import NatsServer, free_port
from gateway.settings import GatewaySettings

from tests.gateway_fixtures import ChatClient, GatewayProc


@pytest.fixture(scope="module")
def tls_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    base = tmp_path_factory.mktemp("tls-nats")
    certs.make_all(base / "tls")
    server = NatsServer.deployed_tls(base / "nats", base / "tls").start()
    yield server
    server.stop()


def tls_dir(server: NatsServer) -> Path:
    assert server.tls_dir is not None
    return server.tls_dir


async def refused(**options: Any) -> str:
    """What nats.connect raises with these options (it must raise)."""
    try:
        nc = await nats.connect(
            allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3, **options
        )
    except Exception as exc:  # nats-py raises several kinds, depending on the stage
        return f"{type(exc).__name__}: {exc}"
    await nc.close()
    raise AssertionError(f"connected with {options}")


async def test_a_service_with_its_nkey_over_verified_tls_connects(tls_nats: NatsServer) -> None:
    folder = tls_dir(tls_nats)
    settings = GatewaySettings(
        nats_servers=[tls_nats.url],
        nats_nkey_seed_file=str(folder / "nkeys" / "gateway.nk"),
        nats_tls_ca_file=str(folder / "ca.crt"),
    )
    nc = await nats_wiring.connect(settings, "gw-test")
    try:
        # Connected, so over TLS: this server refuses plaintext (see below).
        assert nc.is_connected
        await nc.publish("typing.room.lobby", b"{}")  # an allowed subject
        await nc.flush()
    finally:
        await nc.close()


async def test_a_wrong_nkey_is_refused(tls_nats: NatsServer) -> None:
    folder = tls_dir(tls_nats)
    stranger = folder / "stranger.nk"
    seed, _ = certs.new_nkey()
    stranger.write_bytes(seed)
    context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    error = await refused(servers=[tls_nats.url], nkeys_seed=str(stranger), tls=context)
    assert "authorization" in error.lower(), error
    # Nor does a password (the dev set-up's) get anyone in here.
    error = await refused(
        servers=[tls_nats.url.replace("nats://", "nats://gateway:test-gateway@")], tls=context
    )
    assert "authorization" in error.lower(), error


async def test_a_client_without_tls_is_refused(tls_nats: NatsServer) -> None:
    # Speaking plaintext on the socket: the server insists on TLS and never lets it in.
    def plaintext() -> bytes:
        with socket.create_connection(("127.0.0.1", tls_nats.port), timeout=5) as sock:
            info = sock.recv(4096)
            assert b'"tls_required":true' in info, info
            sock.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
            answer = b""
            try:
                while chunk := sock.recv(4096):
                    answer += chunk
            except (ConnectionResetError, TimeoutError):
                pass
            return answer

    answer = await asyncio.to_thread(plaintext)
    assert b"PONG" not in answer
    # A client that does not trust our CA (the system's CAs only) cannot verify the
    # server and gives up, even with the right key.
    seed = str(tls_dir(tls_nats) / "nkeys" / "gateway.nk")
    error = await refused(servers=[tls_nats.url], nkeys_seed=seed, tls=ssl.create_default_context())
    assert "certificate" in error.lower() or "ssl" in error.lower(), error


async def test_a_server_with_a_certificate_from_another_ca_is_refused(
    tmp_path: Path, tls_nats: NatsServer
) -> None:
    # An impostor server whose certificate another CA signed (same names, its own keys):
    # the services verify the peer, so they do not talk to it.
    other = tmp_path / "other"
    certs.make_all(other)
    impostor = NatsServer.deployed_tls(tmp_path / "impostor", other).start()
    try:
        ours = tls_dir(tls_nats)
        context = ssl.create_default_context(cafile=str(ours / "ca.crt"))
        seed = str(ours / "nkeys" / "gateway.nk")
        error = await refused(servers=[impostor.url], nkeys_seed=seed, tls=context)
        assert "certificate" in error.lower() or "ssl" in error.lower(), error
    finally:
        impostor.stop()


def test_nkey_and_password_accounts_grant_the_same_permissions() -> None:
    def permissions_only(conf: str) -> list[str]:
        skip = ("nkey:", "user:", "password:", "#", "{nkey", "{user", "users: [{")
        return [line for line in conf.splitlines() if not line.strip().startswith(skip)]

    nkey_conf = dc.render_accounts_conf("nkey")
    assert permissions_only(nkey_conf) == permissions_only(dc.render_accounts_conf())
    assert "password" not in nkey_conf


async def test_the_gateway_serves_chat_over_tls_with_its_nkey(
    tls_nats: NatsServer, tmp_path: Path
) -> None:
    folder = tls_dir(tls_nats)
    port = free_port()
    env = {
        "GATEWAY_NATS_SERVERS": tls_nats.url,
        "GATEWAY_NATS_NKEY_SEED_FILE": str(folder / "nkeys" / "gateway.nk"),
        "GATEWAY_NATS_TLS_CA_FILE": str(folder / "ca.crt"),
        "GATEWAY_HTTP_PORT": str(port),
        "GATEWAY_HTTP_HOST": "127.0.0.1",
        "GATEWAY_INSTANCE_ID": "gw-tls",
    }
    proc = ServiceProcess("gateway", env, port, tmp_path / "gw-tls.log").start()
    try:
        gw = GatewayProc("gw-tls", port, proc)
        alice = await ChatClient.connect(gw, "tls-alice")
        cid = await alice.send_room("lobby", "over tls")
        ack = await alice.expect(type="ack", client_id=cid)
        await alice.expect(type="message", id=ack["id"])
        await alice.close()
    finally:
        proc.terminate(timeout=10)
