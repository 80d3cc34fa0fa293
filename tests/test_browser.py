"""The web page in a real headless Chromium, against real gateway (and presence) processes.

Two browser contexts are two people: separate storage, separate sockets. Chromium comes
from CHROMIUM_PATH or PATH (Playwright's own browser download is not used). Without it
the tests skip, except in CI (CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from devtools.processes import ServiceProcess
from devtools.servers import free_port, url_as

from tests.gateway_fixtures import GatewayProc, start_gateways

pytestmark = pytest.mark.browser

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000
XSS = "<img src=x onerror=alert(1)>"


def find_chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM_PATH")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: browser tests must run)")
    pytest.skip(reason)


def has_entry_point(package: str) -> bool:
    try:
        return importlib.util.find_spec(f"{package}.__main__") is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    executable = find_chromium()
    if executable is None:
        skip_or_fail("no Chromium found (install chromium or set CHROMIUM_PATH)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        skip_or_fail("playwright is not installed")
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        await instance.close()


class Stack:
    """The processes behind the page: one gateway and, when it exists, presence."""

    def __init__(self, gateway: GatewayProc, presence: ServiceProcess | None) -> None:
        self.gateway = gateway
        self.presence = presence

    @property
    def url(self) -> str:
        return f"{self.gateway.http_url}/"


@pytest.fixture
def stack(nc: Any, nats_server: Any, logs_dir: Path) -> Iterator[Stack]:
    """Gateway (+ presence when written) on a freshly wiped NATS (`nc` wipes the streams)."""
    if not has_entry_point("gateway"):
        skip_or_fail("the gateway service has no entry point yet")
    presence: ServiceProcess | None = None
    try:
        if has_entry_point("presence"):
            port = free_port()
            env = {
                "PRESENCE_NATS_SERVERS": url_as(nats_server.url, "presence"),
                "PRESENCE_HTTP_PORT": str(port),
            }
            presence = ServiceProcess("presence", env, port, logs_dir / "presence.log").start()
        with start_gateways(nats_server.url, logs_dir, count=1) as gateways:
            yield Stack(gateways[0], presence)
    finally:
        if presence is not None:
            presence.terminate()


class Person:
    """One browser context signed in on the page, recording page errors and dialogs."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    async def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def message(self, sender: str, text: str) -> Any:
        """Rendered messages from `sender` whose text content is exactly `text`."""
        exactly = re.compile(f"^{re.escape(text)}$")
        content = self.page.get_by_test_id("content").filter(has_text=exactly)
        return self.page.locator(f'#message-list li[data-sender="{sender}"]', has=content)

    async def say(self, text: str) -> None:
        await self.page.fill("#composer", text)
        await self.page.press("#composer", "Enter")


async def sign_in(browser: Any, url: str, name: str) -> Person:
    context = await browser.new_context(viewport={"width": 1100, "height": 720})
    person = Person(await context.new_page())
    page = person.page
    await page.goto(url)
    await page.fill("#name", name)
    await page.click("#signin")
    await page.wait_for_selector("#status[data-state=online]", timeout=WAIT_MS)
    return person


async def test_two_people_chat_in_the_lobby_and_see_each_other_online(
    browser: Any, stack: Stack
) -> None:
    from playwright.async_api import expect

    alice = await sign_in(browser, stack.url, "alice")
    bob = await sign_in(browser, stack.url, "bob")
    try:
        for person in (alice, bob):
            await expect(person.page.locator("#thread-title")).to_have_text("# lobby")
        if stack.presence is not None:
            await expect(alice.page.locator('#online li[data-user="bob"]')).to_be_visible(
                timeout=WAIT_MS
            )
            await expect(bob.page.locator('#online li[data-user="alice"]')).to_be_visible(
                timeout=WAIT_MS
            )

        await alice.say("hello bob")

        await expect(bob.message("alice", "hello bob")).to_have_count(1, timeout=WAIT_MS)
        mine = alice.page.locator('#message-list li[data-sender="alice"]:not(.pending)')
        await expect(mine.filter(has_text="hello bob")).to_have_attribute(
            "data-state", "acked", timeout=WAIT_MS
        )
        assert await alice.page.locator("#message-list li.pending").count() == 0
        assert alice.errors == [] and bob.errors == []
    finally:
        await alice.page.context.close()
        await bob.page.context.close()


async def test_markup_in_a_message_is_shown_as_literal_text(browser: Any, stack: Stack) -> None:
    from playwright.async_api import expect

    alice = await sign_in(browser, stack.url, "alice")
    bob = await sign_in(browser, stack.url, "bob")
    try:
        await alice.say(XSS)

        for person in (alice, bob):
            shown = person.message("alice", XSS).locator("[data-testid=content]")
            await expect(shown).to_have_count(1, timeout=WAIT_MS)
            assert await shown.text_content() == XSS
            assert await person.page.locator("#messages img").count() == 0
        # The sender's own copy must also have been acked, i.e. the round trip finished
        # before we conclude that no handler ran.
        await expect(alice.message("alice", XSS)).to_have_attribute(
            "data-state", "acked", timeout=WAIT_MS
        )
        assert alice.dialogs == [] and bob.dialogs == []
        assert alice.errors == [] and bob.errors == []
    finally:
        await alice.page.context.close()
        await bob.page.context.close()


async def test_page_shows_reconnecting_and_delivers_a_message_typed_while_offline(
    browser: Any, stack: Stack
) -> None:
    from playwright.async_api import expect

    alice = await sign_in(browser, stack.url, "alice")
    bob = await sign_in(browser, stack.url, "bob")
    try:
        stack.gateway.proc.terminate()
        for person in (alice, bob):
            await expect(person.page.locator("#status")).to_have_attribute(
                "data-state", "reconnecting", timeout=WAIT_MS
            )
            await expect(person.page.locator("#status")).to_have_text("reconnecting…")

        await alice.say("sent while offline")
        pending = alice.page.locator("#message-list li.pending", has_text="sent while offline")
        await expect(pending).to_have_attribute("data-state", "waiting")

        stack.gateway.proc.start()  # same port: the page's automatic reconnect finds it

        for person in (alice, bob):
            await expect(person.page.locator("#status")).to_have_attribute(
                "data-state", "online", timeout=30_000
            )
        await expect(bob.message("alice", "sent while offline")).to_have_count(1, timeout=WAIT_MS)
        acked = alice.page.locator(
            '#message-list li[data-sender="alice"][data-state="acked"]:not(.pending)'
        )
        await expect(acked.filter(has_text="sent while offline")).to_have_count(1, timeout=WAIT_MS)
        await expect(alice.page.locator("#message-list li.pending")).to_have_count(0)
    finally:
        await alice.page.context.close()
        await bob.page.context.close()


async def test_direct_message_opens_from_online_list_and_shows_unread_badge(
    browser: Any, stack: Stack
) -> None:
    from playwright.async_api import expect

    if stack.presence is None:
        pytest.skip("needs the presence service for the online list")
    alice = await sign_in(browser, stack.url, "alice")
    bob = await sign_in(browser, stack.url, "bob")
    try:
        await alice.page.click('#online li[data-user="bob"] button', timeout=WAIT_MS)
        await expect(alice.page.locator("#thread-title")).to_have_text("@ bob")
        await alice.say("psst, just you")

        badge = bob.page.locator('#dms li[data-peer="alice"] .badge')
        await expect(badge).to_have_text("1", timeout=WAIT_MS)
        # Still in the lobby: the DM did not land in the open thread.
        await expect(bob.message("alice", "psst, just you")).to_have_count(0)

        await bob.page.click('#dms li[data-peer="alice"] button')
        await expect(bob.message("alice", "psst, just you")).to_have_count(1)
        await expect(badge).to_have_count(0)
    finally:
        await alice.page.context.close()
        await bob.page.context.close()
