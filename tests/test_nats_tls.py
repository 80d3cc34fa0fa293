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

ROOT = Path(__file__).resolve().parents[1]


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


def cluster_node(base: Path, tls: Path, name: str, route_port: int, peers: list[int]) -> NatsServer:
    """One server of a TLS cluster: client TLS as deploy/nats/nats-tls.conf, routes with
    mutual TLS as k8s/overlays/prod/nats.conf."""
    prod = (ROOT / "k8s/overlays/prod/nats.conf").read_text()
    route_tls = prod.split("cluster {", 1)[1].split("tls {", 1)[1].split("}", 1)[0]
    route_tls = route_tls.replace("/etc/nats-tls/tls.", f"{tls}/nats.")
    route_tls = route_tls.replace("/etc/nats-tls/", f"{tls}/")
    routes = "\n".join(f"    nats://127.0.0.1:{p}" for p in peers)
    accounts = (ROOT / "deploy/nats/accounts-nkeys.conf").read_text()
    (base / name).mkdir(parents=True, exist_ok=True)
    (base / name / "accounts-nkeys.conf").write_text(accounts)
    config = f"""
server_name: {name}
tls {{
  cert_file: {tls}/nats.crt
  key_file: {tls}/nats.key
  ca_file: {tls}/ca.crt
}}
cluster {{
  name: chat-test
  port: {route_port}
  routes: [
{routes}
  ]
  tls {{{route_tls}}}
}}
include ./accounts-nkeys.conf
"""
    env = dict(line.split("=", 1) for line in (tls / "nkeys.env").read_text().splitlines())
    return NatsServer(base / name, config=config, env=env)


def routed_to(server: NatsServer) -> set[str]:
    """The servers `server` has routes to (routes are pooled: several per peer)."""
    import json
    import urllib.request

    url = f"http://127.0.0.1:{server.monitor_port}/routez"
    with urllib.request.urlopen(url, timeout=2) as resp:
        return {r.get("remote_name", "") for r in json.load(resp).get("routes") or []}


async def test_cluster_routes_are_mutual_tls_and_refuse_a_server_from_another_ca(
    tmp_path: Path,
) -> None:
    from tests.waiting import wait_until

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    certs.make_all(ours)
    certs.make_all(theirs)
    # Same NKeys on the impostor, so only its certificate differs.
    (theirs / "nkeys.env").write_text((ours / "nkeys.env").read_text())
    p1, p2, p3 = free_port(), free_port(), free_port()
    nodes = [
        cluster_node(tmp_path, ours, "n1", p1, [p2]),
        cluster_node(tmp_path, ours, "n2", p2, [p1]),
    ]
    impostor = cluster_node(tmp_path, theirs, "n3", p3, [p1, p2])
    started: list[NatsServer] = []
    try:
        for node in nodes:
            started.append(node)
            await asyncio.to_thread(_start_without_jetstream_wait, node)
        await wait_until(
            lambda: routed_to(nodes[0]) == {"n2"} and routed_to(nodes[1]) == {"n1"},
            "n1 and n2 routed over mutual TLS",
            timeout=20,
        )
        started.append(impostor)
        await asyncio.to_thread(_start_without_jetstream_wait, impostor)

        def refused_route() -> bool:
            return "TLS route handshake error" in impostor.log_file.read_text()

        await wait_until(refused_route, "the impostor's routes refused", timeout=20)
        assert routed_to(impostor) == set()
        assert routed_to(nodes[0]) == {"n2"} and routed_to(nodes[1]) == {"n1"}
    finally:
        for node in started:
            node.stop()


def _start_without_jetstream_wait(server: NatsServer) -> None:
    """Start a cluster node: JetStream waits for a quorum, so wait only for the ports."""
    server.extra_args = []
    original = server._wait_jetstream
    server._wait_jetstream = lambda timeout=20.0: None  # type: ignore[method-assign]
    try:
        server.start()
    finally:
        server._wait_jetstream = original  # type: ignore[method-assign]
