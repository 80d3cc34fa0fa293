"""The README is the protocol's contract: it must name everything the gateway can say."""

from __future__ import annotations

import re
from pathlib import Path

from gateway import frames

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GATEWAY_SOURCES = "\n".join(p.read_text() for p in (ROOT / "services/gateway").glob("*.py"))


def test_every_error_code_the_gateway_sends_is_documented() -> None:
    codes = set(re.findall(r'FrameError\(\s*"([a-z_]+)"', GATEWAY_SOURCES))
    assert {"bad_json", "send_failed", "rate_limited"} <= codes  # the scan finds them
    missing = sorted(c for c in codes if f"`{c}`" not in README)
    assert not missing, f"error codes missing from the README: {missing}"


def test_every_close_code_and_client_frame_type_is_documented() -> None:
    closes = [v for k, v in vars(frames).items() if k.startswith("CLOSE_")]
    assert len(closes) >= 5
    missing = [c for c in closes if f"| {c} |" not in README]
    assert not missing, f"close codes missing from the README's table: {missing}"
    undocumented = sorted(t for t in frames.CLIENT_TYPES if f'{{"type":"{t}"' not in README)
    assert not undocumented, f"client frame types without an example: {undocumented}"
