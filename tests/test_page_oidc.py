"""The page signs in through a real OpenID Connect provider (tests/oidc_fixtures.py), in
a real headless Chromium: authorization code + PKCE, chat, token refresh on the open
socket without a disconnect, sign-out that ends the provider's session too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devtools.processes import ServiceProcess
from devtools.servers import free_port, url_as
from nats.aio.client import Client as NATS

from tests import test_browser
from tests.gateway_fixtures import ChatClient, GatewayProc
from tests.oidc_fixtures import CLIENT_ID, OidcProvider, run_provider

pytestmark = pytest.mark.browser

WAIT_MS = 15_000
# Short-lived ID tokens: the page refreshes at 70 % of the lifetime, so within a test.
ID_TOKEN_TTL = 12
# Counts the WebSockets the page opens: a refresh must not open a new one.
INIT_SCRIPT = """
(() => {
  const Real = window.WebSocket;
  window.__sockets = 0;
  window.WebSocket = class extends Real {
    constructor(...args) {
      super(...args);
      window.__sockets += 1;
    }
  };
})();
"""

browser = test_browser.browser


@pytest.fixture
def oidc_stack(
    nc: NATS, nats_server: Any, logs_dir: Path
) -> Iterator[tuple[GatewayProc, OidcProvider]]:
    """A gateway in oidc mode and the provider, which knows the gateway's page as the
    client's redirect URI (so the gateway's port is chosen first)."""
    port = free_port()
    page = f"http://127.0.0.1:{port}/"
    for provider in run_provider(logs_dir / "oidc.log", [page], ID_TOKEN_TTL):
        env = {
            "GATEWAY_NATS_SERVERS": url_as(nats_server.url, "gateway"),
            "GATEWAY_HTTP_PORT": str(port),
            "GATEWAY_HTTP_HOST": "127.0.0.1",
            "GATEWAY_INSTANCE_ID": "gw-oidc",
            "GATEWAY_DRAIN_TIMEOUT": "3",
            "GATEWAY_AUTH_MODE": "oidc",
            "GATEWAY_OIDC_ISSUER": provider.issuer,
            "GATEWAY_OIDC_CLIENT_ID": CLIENT_ID,
            "GATEWAY_OIDC_LEEWAY": "0",
        }
        proc = ServiceProcess("gateway", env, port, logs_dir / "gw-oidc.log").start()
        try:
            yield GatewayProc("gw-oidc", port, proc), provider
        finally:
            proc.terminate(timeout=10)


async def provider_login(page: Any, provider: OidcProvider, user: str) -> None:
    """Fill the provider's own login form (its development interactions)."""
    await page.wait_for_url(f"{provider.issuer}/**", timeout=WAIT_MS)
    await page.fill("input[name=login]", user)
    await page.fill("input[name=password]", "any password")
    await page.click("button[type=submit]")


async def test_sign_in_chat_refresh_and_sign_out_through_the_provider(
    browser: Any, oidc_stack: tuple[GatewayProc, OidcProvider]
) -> None:
    from playwright.async_api import expect

    gw, provider = oidc_stack
    context = await browser.new_context(viewport={"width": 1100, "height": 720})
    await context.add_init_script(INIT_SCRIPT)
    page = await context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    await page.goto(gw.http_url + "/")
    await expect(page.locator("#signin-hint")).to_contain_text("organisation")
    await expect(page.locator("#name")).to_be_hidden()

    # Sign in: off to the provider (with a PKCE challenge), its login form, and back.
    await page.click("#signin")
    await provider_login(page, provider, "sara")
    await page.wait_for_selector("#status[data-state=online]", timeout=WAIT_MS)
    await expect(page.locator("#me")).to_have_text("sara")
    authorize = next(u for u in requests if u.startswith(f"{provider.issuer}/auth?"))
    assert "code_challenge_method=S256" in authorize and "code_challenge=" in authorize
    assert "code=" not in page.url  # the single-use code is not left in the address bar
    first_token = await page.evaluate("sessionStorage.getItem('natschat.token')")

    # Chat with someone signed in through the same provider (a bare client).
    tom_tokens = await asyncio.to_thread(provider.sign_in, "tom")
    tom = await ChatClient.connect(gw, "tom", token=tom_tokens.id_token)
    await page.fill("#composer", "hello from sara")
    await page.press("#composer", "Enter")
    seen = await tom.expect(type="message", sender="sara", timeout=10)
    assert seen["content"] == "hello from sara"

    # The page refreshes its tokens before they expire and hands the new ID token to
    # the open socket (an `auth` frame): same socket, no reconnect, no status change.
    async def refreshed() -> bool:
        token = await page.evaluate("sessionStorage.getItem('natschat.token')")
        return bool(token) and token != first_token

    await wait_for(refreshed, "the page refreshed its token", ID_TOKEN_TTL + 10)
    # tom renews his socket the same way (by hand).
    tom_tokens = await asyncio.to_thread(provider.refresh, tom_tokens)
    await tom.send({"type": "auth", "token": tom_tokens.id_token})
    await tom.expect(type="auth")
    first_exp = _exp(first_token)
    # Past the first token's expiry: the gateway would have closed a socket whose token
    # was not renewed (4401); this one is still the page's first and only socket.
    await wait_for(lambda: time.time() > first_exp + 1, "the first token expired", 15)
    cid = await tom.send_room("lobby", "still there, sara?")
    await tom.expect(type="ack", client_id=cid)
    await expect(page.locator("#message-list")).to_contain_text(
        "still there, sara?", timeout=WAIT_MS
    )
    await expect(page.locator("#status")).to_have_attribute("data-state", "online")
    assert await page.evaluate("window.__sockets") == 1
    await expect(page.locator("#conn-bar")).to_be_hidden()

    # Sign out: the page forgets the tokens and ends the provider's session too.
    await page.click("#signout")
    await page.wait_for_url(f"{provider.issuer}/**", timeout=WAIT_MS)
    await page.click("button[value=yes]")
    await page.wait_for_url(gw.http_url + "/**", timeout=WAIT_MS)
    await expect(page.locator("#signin-view")).to_be_visible(timeout=WAIT_MS)
    assert await page.evaluate("sessionStorage.getItem('natschat.oidc')") is None
    # Signing in again asks for the login again: the provider's session is over.
    await page.click("#signin")
    await page.wait_for_url(f"{provider.issuer}/**", timeout=WAIT_MS)
    await expect(page.locator("input[name=login]")).to_be_visible(timeout=WAIT_MS)
    await tom.close()
    await context.close()


async def test_an_account_without_a_usable_name_gets_a_clear_page(
    browser: Any, oidc_stack: tuple[GatewayProc, OidcProvider]
) -> None:
    from playwright.async_api import expect

    gw, provider = oidc_stack
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(gw.http_url + "/")
    await page.click("#signin")
    await provider_login(page, provider, "Sara.Smith")  # not a valid chat name
    error = page.locator("#signin-error")
    await expect(error).to_be_visible(timeout=WAIT_MS)
    await expect(error).to_contain_text("cannot be used here")
    await expect(page.locator("#chat-view")).to_be_hidden()
    await context.close()


def _exp(token: str) -> float:
    import base64
    import json

    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


async def wait_for(condition: Any, what: str, timeout: float) -> None:
    from tests.waiting import wait_until

    await wait_until(condition, what, timeout=timeout)
