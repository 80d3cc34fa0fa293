"""Postgres as the prod overlay runs it: TLS on, `pg_hba.conf` letting the network in
only over TLS (k8s/overlays/prod/pg_hba.conf), certificates from `make certs`; the
archive's connection string verifies the server (sslmode=verify-full)."""

from __future__ import annotations

import os
import pwd
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from devtools import certs
from devtools.servers import PostgresServer

from tests.reference_protobuf import IN_CI

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "tls-test-password"


def postgres_with_ssl() -> Path:
    """A Postgres build linked with OpenSSL: the pgserver wheel's is not; Debian's
    `postgresql` package is (CI installs it)."""
    import subprocess

    candidates = [PostgresServer(Path("/nonexistent")).bin_dir]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        binary = folder / "postgres"
        if binary.exists():
            linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
            if "libssl" in linked.stdout:
                return folder
    if IN_CI:
        pytest.fail("no Postgres with SSL support: apt-get install postgresql")
    pytest.skip("no Postgres with SSL support here: apt-get install postgresql")


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresServer, Path]]:
    base = tmp_path_factory.mktemp("pg-tls")
    tls = base / "tls"
    certs.make_all(tls)
    conf = base / "conf"
    conf.mkdir()
    shutil.copy(ROOT / "k8s/overlays/prod/pg_hba.conf", conf / "pg_hba.conf")
    server = PostgresServer(
        base / "pg",
        options=[
            "ssl=on",
            f"ssl_cert_file={tls}/postgres.crt",
            f"ssl_key_file={tls}/postgres.key",
            "ssl_min_protocol_version=TLSv1.2",
            f"hba_file={conf}/pg_hba.conf",
        ],
    )
    server.bin_dir = postgres_with_ssl()
    server.init()
    if server.run_as:  # the key must belong to the server's user, mode 0600
        entry = pwd.getpwnam(server.run_as)
        for path in (tls, conf, tls / "postgres.key", tls / "postgres.crt", conf / "pg_hba.conf"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(base, 0o755)
    server.start()
    yield server, tls
    server.stop()


async def set_password(server: PostgresServer) -> None:
    # Over the unix socket (`local ... trust`), as the image's init scripts do.
    conn = await asyncpg.connect(host=str(server.socket_dir), port=server.port, user="postgres")
    await conn.execute(f"ALTER USER postgres PASSWORD '{PASSWORD}'")
    await conn.close()


def dsn(server: PostgresServer, query: str) -> str:
    return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{server.port}/postgres?{query}"


async def test_the_archive_connects_over_verified_tls_and_plaintext_is_refused(
    tls_postgres: tuple[PostgresServer, Path], tmp_path: Path
) -> None:
    server, tls = tls_postgres
    await set_password(server)
    # The archive's connection string in the prod overlay: verify-full against our CA.
    conn = await asyncpg.connect(dsn(server, f"sslmode=verify-full&sslrootcert={tls}/ca.crt"))
    assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    await conn.close()
    # Plaintext: no pg_hba.conf line lets it in.
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(dsn(server, "sslmode=disable"))
    # A client trusting another CA does not talk to this server (verify-full).
    other = tmp_path / "other"
    certs.make_all(other)
    with pytest.raises((ssl.SSLError, ssl.SSLCertVerificationError, OSError)):
        await asyncpg.connect(dsn(server, f"sslmode=verify-full&sslrootcert={other}/ca.crt"))
