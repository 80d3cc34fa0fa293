"""The README is the protocol's contract: it must name everything the gateway can say."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from gateway import frames
from gateway.app import Gateway, build_app
from gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GATEWAY_SOURCES = "\n".join(p.read_text() for p in (ROOT / "services/gateway").glob("*.py"))


def test_every_error_code_the_gateway_sends_is_documented() -> None:
    codes = set(re.findall(r'FrameError\(\s*"([a-z_]+)"', GATEWAY_SOURCES))
    assert {"bad_json", "send_failed", "rate_limited"} <= codes  # the scan finds them
    missing = sorted(c for c in codes if f"`{c}`" not in README)
    assert not missing, f"error codes missing from the README: {missing}"


async def test_every_ack_field_and_config_limit_is_documented() -> None:
    handlers = (ROOT / "services/gateway/handlers.py").read_text()
    optional = set(re.findall(r'ack_frame\["([a-z_]+)"\]', handlers))
    assert "duplicate" in optional  # the scan finds them
    acks = [line for line in README.splitlines() if line.startswith('{"type":"ack"')]
    missing = sorted(f for f in optional if not any(f'"{f}":' in a for a in acks))
    assert not missing, f"ack fields without an example in the README: {missing}"
    transport = httpx.ASGITransport(app=build_app(Gateway(GatewaySettings())))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        limits = (await client.get("/api/config")).json()["limits"]
    assert {"rate_burst", "read_rate_burst"} <= set(limits)
    config_row = next(line for line in README.splitlines() if "`GET /api/config`" in line)
    undocumented = sorted(k for k in limits if f'"{k}"' not in config_row)
    assert not undocumented, f"/api/config limits missing from the README: {undocumented}"


def test_every_close_code_and_client_frame_type_is_documented() -> None:
    closes = [v for k, v in vars(frames).items() if k.startswith("CLOSE_")]
    assert len(closes) >= 5
    missing = [c for c in closes if f"| {c} |" not in README]
    assert not missing, f"close codes missing from the README's table: {missing}"
    undocumented = sorted(t for t in frames.CLIENT_TYPES if f'{{"type":"{t}"' not in README)
    assert not undocumented, f"client frame types without an example: {undocumented}"
