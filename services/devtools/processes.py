"""Run a service's real entry point as a child process, and stop or SIGKILL it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class ServiceProcess:
    """`python -m <module>` with the given environment; ready when /readyz answers 200."""

    def __init__(
        self,
        module: str,
        env: dict[str, str],
        http_port: int,
        log_file: Path,
        own_session: bool = False,
    ) -> None:
        self.module = module
        self.env = env
        self.http_port = http_port
        self.log_file = log_file
        # Its own session, hence (with the kernel's autogroup scheduling) its own share of
        # the CPU, as a service in its own container has; whoever started it stops it.
        self.own_session = own_session
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> ServiceProcess:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=self.own_session,
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def probe(self, path: str) -> int:
        try:
            url = f"http://127.0.0.1:{self.http_port}{path}"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.module} exited with {self.proc.returncode}; log: {self.log_file}\n"
                    + self.log_file.read_text()[-3000:]
                )
            if self.probe("/readyz") == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.module} not ready after {timeout}s; log: {self.log_file}")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful shutdown path. Returns the exit code."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        self._end(signal.SIGKILL, 10)

    def _end(self, sig: int, timeout: float) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return int(code)
