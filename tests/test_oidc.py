"""OIDC sign-in against a real provider (tests/oidc_fixtures.py: panva's oidc-provider):
tokens verified through its JWKS, key rotation, the `auth` frame, 4401 on expiry.

The browser side (the page's code flow with PKCE) is in tests/test_page_oidc.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from nats.aio.client import Client as NATS

from tests.gateway_fixtures import ChatClient, GatewayProc, http_json, start_gateways
from tests.oidc_fixtures import CLIENT_ID, OidcProvider, run_provider

# Short-lived ID tokens, so that expiry and refresh happen within a test.
ID_TOKEN_TTL = 8


@pytest.fixture
def provider(logs_dir: Path) -> Iterator[OidcProvider]:
    yield from run_provider(logs_dir / "oidc.log", ["http://127.0.0.1:1/"], ID_TOKEN_TTL)


@pytest.fixture
def oidc_gateways(
    nc: NATS, nats_server: Any, logs_dir: Path, provider: OidcProvider
) -> Iterator[list[GatewayProc]]:
    env = {
        "GATEWAY_AUTH_MODE": "oidc",
        "GATEWAY_OIDC_ISSUER": provider.issuer,
        "GATEWAY_OIDC_CLIENT_ID": CLIENT_ID,
        # No clock skew between the provider and us here: expiry is exact.
        "GATEWAY_OIDC_LEEWAY": "0",
        # An unknown kid refetches the key set at once: the rotation below may come
        # within any cooldown of the last fetch (the cooldown is tests/test_oidc_verify.py's).
        "GATEWAY_OIDC_JWKS_COOLDOWN": "0",
    }
    with start_gateways(nats_server.url, logs_dir, 2, env) as gws:
        yield gws


async def sign_in(provider: OidcProvider, user: str) -> Any:
    return await asyncio.to_thread(provider.sign_in, user)


async def test_provider_tokens_sign_in_and_the_page_learns_the_issuer(
    oidc_gateways: list[GatewayProc], provider: OidcProvider
) -> None:
    gw = oidc_gateways[0]
    tokens = await sign_in(provider, "nora")
    nora = await ChatClient.connect(gw, "nora", token=tokens.id_token)
    assert nora.welcome["user"] == "nora"
    status, config = await asyncio.to_thread(http_json, gw, "/api/config")
    assert status == 200 and config["auth_mode"] == "oidc"
    assert config["oidc"]["issuer"] == provider.issuer
    assert config["oidc"]["client_id"] == CLIENT_ID
    # No guest names in oidc mode.
    status, _ = await asyncio.to_thread(http_json, gw, "/api/guest", {"name": "nora"})
    assert status == 404
    await nora.close()


async def test_tokens_the_provider_did_not_sign_for_us_are_refused(
    oidc_gateways: list[GatewayProc], provider: OidcProvider
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    gw = oidc_gateways[0]
    real = await sign_in(provider, "olga")
    claims = real.claims
    header = jwt.get_unverified_header(real.id_token)
    own_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = [
        # Same claims and kid, our own key: the signature does not verify.
        jwt.encode(claims, own_key, "RS256", headers={"kid": header["kid"]}),
        # A kid the provider never published (refetching the key set does not find it).
        jwt.encode(claims, own_key, "RS256", headers={"kid": "made-up"}),
        # Algorithm confusion: HS256 with the provider's public key as the secret.
        jwt.encode(claims, "x" * 32, "HS256", headers={"kid": header["kid"]}),
    ]
    for token in forged:
        client = await ChatClient.open(gw, "someone")
        await client.send({"type": "hello", "v": 1, "token": token})
        await client.expect(type="error", code="unauthorized")
        assert await client.expect_closed() == 4401
    # A login that is not a valid user name never becomes one.
    bad = await sign_in(provider, "Not.Valid")
    client = await ChatClient.open(gw, "someone")
    await client.send({"type": "hello", "v": 1, "token": bad.id_token})
    error = await client.expect(type="error", code="unauthorized")
    assert "valid name" in error["message"]


async def keep_fresh(provider: OidcProvider, client: ChatClient, tokens: Any) -> None:
    """What the page does: refresh well before expiry and send the new ID token on the
    open socket (`auth`), until cancelled."""
    while True:
        await asyncio.sleep(ID_TOKEN_TTL / 4)  # pacing the renewals, as a client would
        tokens = await asyncio.to_thread(provider.refresh, tokens)
        await client.send({"type": "auth", "token": tokens.id_token})


async def test_signing_key_rotation_keeps_existing_and_new_sessions_working(
    oidc_gateways: list[GatewayProc], provider: OidcProvider
) -> None:
    gw_a, gw_b = oidc_gateways
    # pia and quinn sign in before the rotation; pia is connected throughout.
    pia_tokens = await sign_in(provider, "pia")
    quinn_tokens = await sign_in(provider, "quinn")
    old_kid = jwt.get_unverified_header(pia_tokens.id_token)["kid"]
    pia = await ChatClient.connect(gw_a, "pia", token=pia_tokens.id_token)

    kids = await asyncio.to_thread(provider.rotate)
    assert kids[1] == old_kid and kids[0] != old_kid

    # A new sign-in gets a token signed with the new key: the gateways, which cached
    # the old key set, look the new kid up and let it in.
    rex_tokens = await sign_in(provider, "rex")
    assert jwt.get_unverified_header(rex_tokens.id_token)["kid"] == kids[0]
    rex = await ChatClient.connect(gw_b, "rex", token=rex_tokens.id_token)
    renewing = [asyncio.create_task(keep_fresh(provider, rex, rex_tokens))]
    # A token signed before the rotation still verifies (the old key is still published).
    quinn = await ChatClient.connect(gw_b, "quinn", token=quinn_tokens.id_token)

    # pia refreshes (her new token is signed with the new key) and renews her socket
    # before the first token expires: confirmed, and the socket lives on past it.
    fresh = await asyncio.to_thread(provider.refresh, pia_tokens)
    assert jwt.get_unverified_header(fresh.id_token)["kid"] == kids[0]
    await pia.send({"type": "auth", "token": fresh.id_token})
    confirmed = await pia.expect(type="auth")
    assert confirmed["user"] == "pia" and confirmed["expires_at"] > time.time() * 1000
    renewing.append(asyncio.create_task(keep_fresh(provider, pia, fresh)))

    # quinn does not renew: told, then closed with 4401 when his token expires.
    expired = await quinn.expect(type="error", code="unauthorized", timeout=ID_TOKEN_TTL + 5)
    assert "expired" in expired["message"]
    assert await quinn.expect_closed() == 4401
    # pia's first token has expired by now; her socket still works across gateways.
    assert time.time() > pia_tokens.claims["exp"]
    cid = await pia.send_room("lobby", "after the rotation")
    ack = await pia.expect(type="ack", client_id=cid)
    seen = await rex.expect(type="message", id=ack["id"])
    assert seen["sender"] == "pia"
    assert pia.close_code is None
    # A renewal with someone else's token is refused and changes nothing.
    await pia.send({"type": "auth", "token": rex_tokens.id_token})
    await pia.expect(type="error", code="unauthorized", ref="auth")
    assert pia.close_code is None and rex.close_code is None
    for task in renewing:
        task.cancel()
    for client in (pia, rex):
        await client.close()
