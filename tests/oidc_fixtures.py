"""A real OpenID Connect provider for the tests: panva's `oidc-provider` (npm; OpenID
Certified: discovery, JWKS, authorization code + PKCE, refresh tokens, RP-initiated
logout) run by node as a child process (tests/oidc/provider.mjs).

Why this one: it is the most used open-source OIDC server that installs from a package
registry and starts in a second without a database; its development login form lets
Chromium sign in like a person, and the same code flow can be walked over plain HTTP
(`sign_in`) for tests without a browser. Installed on demand (npm, once), like the
interop tests' libraries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from devtools.servers import free_port

from tests.reference_protobuf import IN_CI

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
CLIENT_ID = "natschat-page"


def oidc_provider_dir() -> Path:
    """tests/oidc with oidc-provider installed (npm, once); skips (fails in CI) without
    Node."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        if IN_CI:
            pytest.fail("node and npm are needed for the OIDC provider in CI")
        pytest.skip("node/npm not installed: apt-get install nodejs npm")
    if not (OIDC_DIR / "node_modules" / "oidc-provider").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--silent"],
            cwd=OIDC_DIR, check=True, capture_output=True, timeout=240,
        )  # fmt: skip
    return OIDC_DIR


@dataclass
class Tokens:
    id_token: str
    refresh_token: str
    expires_in: int

    @property
    def claims(self) -> dict[str, Any]:
        payload = self.id_token.split(".")[1]
        return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


class OidcProvider:
    def __init__(self, log_file: Path, redirect_uris: list[str], id_token_ttl: int) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.redirect_uris = redirect_uris
        self.config = {
            "port": self.port,
            "admin_port": self.admin_port,
            "issuer": self.issuer,
            "client_id": CLIENT_ID,
            "redirect_uris": redirect_uris,
            "post_logout_redirect_uris": redirect_uris,
            "id_token_ttl": id_token_ttl,
        }
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OidcProvider:
        folder = oidc_provider_dir()
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            ["node", "provider.mjs", json.dumps(self.config)],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"oidc provider exited: {self.log_file.read_text()[-2000:]}")
            try:
                if httpx.get(self.discovery_url, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("oidc provider did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def discovery(self) -> dict[str, Any]:
        return dict(httpx.get(self.discovery_url, timeout=5).json())

    def kids(self) -> list[str]:
        jwks = httpx.get(self.discovery()["jwks_uri"], timeout=5).json()
        return [k["kid"] for k in jwks["keys"]]

    def rotate(self) -> list[str]:
        """A new signing key (published first, used for new tokens); old ones stay."""
        resp = httpx.post(f"http://127.0.0.1:{self.admin_port}/rotate", timeout=10)
        resp.raise_for_status()
        return list(resp.json()["kids"])

    def sign_in(self, username: str) -> Tokens:
        """The authorization code flow with PKCE, as a browser walks it: authorize ->
        the provider's login form -> redirect with a code -> token endpoint."""
        verifier = secrets.token_urlsafe(48)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        redirect_uri = self.redirect_uris[0]
        config = self.discovery()
        query = {
            "client_id": CLIENT_ID,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": "openid profile offline_access",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": secrets.token_urlsafe(8),
        }
        with httpx.Client(timeout=10) as http:
            url = f"{config['authorization_endpoint']}?{urllib.parse.urlencode(query)}"
            code = None
            for _ in range(10):
                resp = http.get(url)
                if resp.is_redirect:
                    url = urllib.parse.urljoin(url, resp.headers["location"])
                    if url.startswith(redirect_uri):
                        code = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["code"][0]
                        break
                    continue
                form = re.search(r'action="([^"]+)"', resp.text)
                assert form, resp.text[:500]
                action = urllib.parse.urljoin(url, form.group(1))
                if 'value="consent"' in resp.text:
                    data = {"prompt": "consent"}
                else:
                    data = {"prompt": "login", "login": username, "password": "pw"}
                resp = http.post(action, data=data)
                assert resp.is_redirect, resp.text[:500]
                url = urllib.parse.urljoin(action, resp.headers["location"])
            assert code, "no authorization code"
            token = http.post(
                config["token_endpoint"],
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": redirect_uri,
                    "client_id": CLIENT_ID,
                    "code_verifier": verifier,
                },
            )
            token.raise_for_status()
            body = token.json()
        return Tokens(body["id_token"], body.get("refresh_token", ""), body["expires_in"])

    def refresh(self, tokens: Tokens) -> Tokens:
        config = self.discovery()
        resp = httpx.post(
            config["token_endpoint"],
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens.refresh_token,
                "client_id": CLIENT_ID,
            },
            timeout=10,
        )
        resp.raise_for_status()
        body = resp.json()
        return Tokens(body["id_token"], body.get("refresh_token", ""), body["expires_in"])


def run_provider(
    log_file: Path, redirect_uris: list[str], id_token_ttl: int = 600
) -> Iterator[OidcProvider]:
    provider = OidcProvider(log_file, redirect_uris, id_token_ttl).start()
    try:
        yield provider
    finally:
        provider.stop()
