"""Helpers for the chatctl tests: run chatctl as a real process, provision the streams."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from chatlib import nats_wiring
from chatlib.settings import CommonSettings
from nats.js import JetStreamContext


@dataclass
class Result:
    code: int
    out: str
    err: str

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def chatctl_env() -> dict[str, str]:
    # The tests name the server with -s; an operator's NATS_URL must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_chatctl(*args: str, stdin: bytes = b"", timeout: float = 20.0) -> Result:
    """`python -m chatctl ARGS` to completion, with a deadline."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatctl",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=chatctl_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"chatctl {' '.join(args)} did not finish in {timeout}s") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def start_chatctl(*args: str) -> asyncio.subprocess.Process:
    """A long-running chatctl (tail) whose output the test reads as it comes."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatctl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=chatctl_env(),
    )


async def read_line(stream: asyncio.StreamReader | None, timeout: float = 10.0) -> str:
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), timeout)
    return line.decode()


async def provision(js: JetStreamContext) -> None:
    """The streams and KV bucket every service creates at start."""
    await nats_wiring.provision(js, CommonSettings())
