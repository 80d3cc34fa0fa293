"""Pure logic of #17: production refuses unsafe sign-in set-ups, and the security headers."""

from __future__ import annotations

import pytest
from gateway.auth import content_security_policy, security_headers
from gateway.settings import GatewaySettings

PRODUCTION = {
    "environment": "production",
    "nats_user": "gateway",
    "allowed_origins": ["https://chat.example"],
}


def test_production_refuses_guest_mode_unless_explicitly_enabled() -> None:
    with pytest.raises(ValueError, match="GUEST_IN_PRODUCTION"):
        GatewaySettings(**PRODUCTION, auth_mode="guest", guest_secret="s" * 32)
    ok = GatewaySettings(
        **PRODUCTION, auth_mode="guest", guest_secret="s" * 32, guest_in_production=True
    )
    assert ok.auth_mode == "guest"
    # Development (make up's laptop default) keeps guests without asking.
    assert GatewaySettings().auth_mode == "guest"


def test_production_oidc_needs_an_https_issuer_and_a_client_id() -> None:
    with pytest.raises(ValueError, match="OIDC_ISSUER"):
        GatewaySettings(**PRODUCTION, auth_mode="oidc", oidc_client_id="page")
    with pytest.raises(ValueError, match="https"):
        GatewaySettings(
            **PRODUCTION, auth_mode="oidc", oidc_issuer="http://id.example", oidc_client_id="p"
        )
    ok = GatewaySettings(
        **PRODUCTION, auth_mode="oidc", oidc_issuer="https://id.example/r", oidc_client_id="p"
    )
    assert ok.oidc_username_claim == "preferred_username"


def test_the_csp_allows_the_oidc_provider_and_no_framing() -> None:
    csp = content_security_policy("https://id.example/realms/chat")
    directives = dict(d.split(" ", 1) for d in csp.split("; "))
    assert directives["connect-src"] == "'self' ws: wss: https://id.example"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert "id.example" not in content_security_policy("")


def test_hsts_only_behind_tls() -> None:
    plain = dict(security_headers("x", https=False, hsts_max_age=100))
    secure = dict(security_headers("x", https=True, hsts_max_age=100))
    assert b"strict-transport-security" not in plain
    assert secure[b"strict-transport-security"] == b"max-age=100"
    for headers in (plain, secure):
        assert headers[b"x-content-type-options"] == b"nosniff"
        assert headers[b"referrer-policy"] == b"no-referrer"


def test_every_test_the_threat_model_names_exists() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    table = readme.split("### Threat model", 1)[1].split("\n\n", 2)[1]
    named = set(re.findall(r"::(test_[a-z0-9_]+)|(?<![:\w])(test_[a-z0-9_]+)`", table))
    names = {a or b for a, b in named}
    assert len(names) >= 12
    sources = "\n".join(p.read_text() for p in (root / "tests").glob("test_*.py"))
    missing = sorted(n for n in names if f"def {n}(" not in sources)
    assert not missing, f"the threat model names tests that do not exist: {missing}"
