"""`make certs`: a local certificate authority, server certificates for NATS and Postgres,
and one NATS NKey per service, for the TLS compose variant and for tests.

    python -m devtools.certs [--out .data/tls]

Writes (never overwrites an existing CA, so certificates stay verifiable across runs):
    ca.crt, ca.key                  the local CA (keep ca.key private)
    nats.crt, nats.key              NATS server (client port and cluster routes)
    postgres.crt, postgres.key      Postgres server
    nkeys/<service>.nk              each service's NKey seed (secret, mode 0600)
    nkeys.env                       NATS_<USER>_NKEY=<public key> for the NATS server

In Kubernetes, cert-manager issues the certificates instead (k8s/overlays/prod).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[2]
# The NATS users that get an NKey: every service, the operators' admin, the system user.
NKEY_USERS = ("gateway", "presence", "archive", "rpc", "admin", "sys")
# Names the servers are reached by: compose service names, Kubernetes Services and pods,
# and this machine (tests, make up).
NATS_NAMES = ["nats", "nats-headless", "*.nats-headless", "*.nats-headless.chat.svc",
              "nats.chat.svc", "localhost", "127.0.0.1"]  # fmt: skip
POSTGRES_NAMES = ["postgres", "postgres.chat.svc", "localhost", "127.0.0.1"]
VALID_DAYS = 365
# Who reads the keys in the containers (docker-compose.tls.yml): the image's user
# (deploy/Dockerfile) reads the services' NKey seeds, the postgres image's user its key.
SERVICE_UID = 10001
POSTGRES_UID = 70


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if secret:
        os.chmod(path, 0o600)


def make_ca(
    out: Path, name: str = "natschat local CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in `out` (made once, then reused)."""
    crt_path, key_path = out / "ca.crt", out / "ca.key"
    if crt_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(crt_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=10 * VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _pem_key(key), secret=True)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def make_cert(
    out: Path,
    name: str,
    hosts: Iterable[str],
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    client: bool = False,
) -> None:
    """<name>.crt/.key signed by `ca`, valid for `hosts` (DNS names or IP addresses), for
    servers (and clients too with `client`: NATS cluster routes are both)."""
    ca_cert, ca_key = ca
    key = _key()
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / f"{name}.key", _pem_key(key), secret=True)
    _write(out / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))


def new_nkey() -> tuple[bytes, str]:
    """A user NKey: (seed, public key)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    return bytes(seed), public


def nkey_env(user: str) -> str:
    """The environment variable the NKey accounts config reads `user`'s public key from."""
    return f"NATS_{user.upper()}_NKEY"


def make_nkeys(out: Path) -> dict[str, str]:
    """A seed file per user in out/nkeys (kept if present) and out/nkeys.env."""
    publics: dict[str, str] = {}
    for user in NKEY_USERS:
        path = out / "nkeys" / f"{user}.nk"
        if path.exists():
            seed = path.read_bytes().strip()
            publics[user] = nkeys.from_seed(bytearray(seed)).public_key.decode()
            continue
        seed, publics[user] = new_nkey()
        _write(path, seed + b"\n", secret=True)
    lines = [f"{nkey_env(u)}={k}" for u, k in publics.items()]
    _write(out / "nkeys.env", ("\n".join(lines) + "\n").encode())
    return publics


def make_all(out: Path) -> None:
    ca = make_ca(out)
    make_cert(out, "nats", NATS_NAMES, ca, client=True)
    make_cert(out, "postgres", POSTGRES_NAMES, ca)
    make_nkeys(out)


def give_to_containers(out: Path) -> None:
    """As root: each secret to the container user that reads it (mode 0600 stays)."""
    if os.geteuid() != 0:
        print("not root: chown the keys yourself for the containers (see docker-compose.tls.yml)")
        return
    os.chown(out / "postgres.key", POSTGRES_UID, POSTGRES_UID)
    for service in ("gateway", "presence", "archive", "rpc"):
        os.chown(out / "nkeys" / f"{service}.nk", SERVICE_UID, SERVICE_UID)


def nkeys_secret_env() -> str:
    """Fresh NKeys as lines for a Kubernetes secrets.env: NATS_<USER>_NKEY (public, for
    the NATS server) and NATS_<SERVICE>_NKEY_SEED (secret, for the service)."""
    lines = []
    for user in NKEY_USERS:
        seed, public = new_nkey()
        lines.append(f"{nkey_env(user)}={public}")
        if user not in ("admin", "sys"):
            lines.append(f"{nkey_env(user)}_SEED={seed.decode()}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".data" / "tls")
    parser.add_argument(
        "--nkeys-env", action="store_true", help="print fresh NKeys for a k8s secrets.env"
    )
    parser.add_argument(
        "--for-containers", action="store_true", help="chown the keys to the containers' users"
    )
    args = parser.parse_args()
    if args.nkeys_env:
        print(nkeys_secret_env(), end="")
        return
    make_all(args.out)
    if args.for_containers:
        give_to_containers(args.out)
    print(f"wrote the CA, NATS and Postgres certificates and NKeys to {args.out}")


if __name__ == "__main__":
    main()
