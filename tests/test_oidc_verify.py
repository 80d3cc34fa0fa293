"""chatlib.auth in oidc mode against a key set served over real HTTP by a tiny local
server (it counts the fetches): claims, leeway, and a bounded key-set refresh rate.
The full provider (sign-in, rotation) is tests/test_oidc.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from chatlib.auth import Authenticator, AuthError
from cryptography.hazmat.primitives.asymmetric import rsa
from gateway.settings import GatewaySettings
from jwt.algorithms import RSAAlgorithm

CLIENT = "natschat-page"


class KeySet:
    """Serves discovery and a JWKS on 127.0.0.1; counts JWKS fetches."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, Any]] = []
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": owner.issuer, "jwks_uri": f"{owner.issuer}/jwks"}
                elif self.path == "/jwks":
                    owner.fetches += 1
                    body = {"keys": [owner.public(kid, key) for kid, key in owner.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def public(kid: str, key: Any) -> dict[str, Any]:
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}

    def add_key(self) -> tuple[str, Any]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = f"k{len(self.keys) + 1}"
        self.keys.insert(0, (kid, key))
        return kid, key

    def token(self, kid: str, key: Any, **claims: Any) -> str:
        now = int(time.time())
        base = {"iss": self.issuer, "aud": CLIENT, "sub": "u1", "iat": now, "exp": now + 300,
                "preferred_username": "alice"}  # fmt: skip
        return jwt.encode({**base, **claims}, key, "RS256", headers={"kid": kid})


@pytest.fixture
def keyset() -> Iterator[KeySet]:
    keys = KeySet()
    yield keys
    keys.server.shutdown()


def authenticator(keyset: KeySet, **settings: Any) -> Authenticator:
    return Authenticator(
        GatewaySettings(
            auth_mode="oidc", oidc_issuer=keyset.issuer, oidc_client_id=CLIENT, **settings
        )
    )


def test_claims_are_checked_with_the_configured_leeway(keyset: KeySet) -> None:
    kid, key = keyset.add_key()
    auth = authenticator(keyset, oidc_leeway=30)
    now = int(time.time())
    assert auth.identify(keyset.token(kid, key)).user == "alice"
    # Within the leeway: a clock 10 s apart is fine.
    assert auth.verify(keyset.token(kid, key, exp=now - 10)) == "alice"
    assert auth.verify(keyset.token(kid, key, nbf=now + 10)) == "alice"
    refused = {
        "expired": keyset.token(kid, key, exp=now - 60),
        "not yet valid": keyset.token(kid, key, nbf=now + 60),
        "another audience": keyset.token(kid, key, aud="someone-else"),
        "another issuer": keyset.token(kid, key, iss="https://evil.example"),
        "no user name claim": keyset.token(kid, key, preferred_username=None),
        "a name we do not allow": keyset.token(kid, key, preferred_username="Alice Smith"),
    }
    for why, token in refused.items():
        try:
            auth.verify(token)
        except AuthError:
            continue
        raise AssertionError(f"accepted a token with {why}")
    # Another claim as the user name, when configured.
    email_style = authenticator(keyset, oidc_username_claim="nickname")
    assert email_style.verify(keyset.token(kid, key, nickname="ally")) == "ally"


def test_a_rotated_key_is_fetched_but_forged_kids_cannot_hammer_the_provider(
    keyset: KeySet,
) -> None:
    kid, key = keyset.add_key()
    auth = authenticator(keyset, oidc_jwks_cooldown=30)
    assert auth.verify(keyset.token(kid, key)) == "alice"
    assert keyset.fetches == 1
    # Cached: more tokens with a known kid fetch nothing.
    for _ in range(5):
        auth.verify(keyset.token(kid, key))
    assert keyset.fetches == 1
    # Forged kids: at most one refetch per cooldown, however many arrive.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for i in range(20):
        with pytest.raises(AuthError):
            auth.verify(keyset.token(f"forged-{i}", stranger))
    assert keyset.fetches <= 2


def test_a_rotation_is_picked_up_on_the_first_token_with_the_new_kid(keyset: KeySet) -> None:
    old_kid, old_key = keyset.add_key()
    auth = authenticator(keyset, oidc_jwks_cooldown=0)
    assert auth.verify(keyset.token(old_kid, old_key)) == "alice"
    new_kid, new_key = keyset.add_key()  # the provider rotates, the old key stays published
    assert auth.verify(keyset.token(new_kid, new_key)) == "alice"
    assert auth.verify(keyset.token(old_kid, old_key)) == "alice"
    assert keyset.fetches == 2
