"""The page's message lifecycle (issue 14) in a real headless Chromium: rich text that can
never become markup, and edit, delete, react, reply and search as people use them (on a
desktop with hover actions, and on a 375 px phone through the "⋯" menu)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from chatlib import ids
from chatlib.proto.chat import v1 as pb

from tests.archive_fixtures import (
    ArchiveProc,
    archive_db,
    archive_procs,
    publish_chat,
    start_archive,
)
from tests.gateway_fixtures import GatewayProc, start_gateways
from tests.test_browser import WAIT_MS, Person, browser, sign_in
from tests.waiting import wait_until

pytestmark = pytest.mark.browser
__all__ = ["archive_db", "archive_procs", "browser"]

HOSTILE = (
    '<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> '
    "[click](javascript:window.__xss=3) javascript:window.__xss=4 "
    "https://example.com/a?b=1. **bold** _it_ `x<b>y</b>` snake_case_name"
    "\n```\n<b>block</b>\n```"
)


@pytest.fixture
async def site(
    nc: Any,
    nats_server: Any,
    database_url: str,
    archive_db: Any,
    archive_procs: list[ArchiveProc],
    logs_dir: Path,
) -> AsyncIterator[GatewayProc]:
    """A gateway and an archive (edits and deletes ask it who wrote a message)."""
    start_archive(archive_procs, nats_server.url, database_url, logs_dir)
    with start_gateways(nats_server.url, logs_dir, count=1) as gateways:
        yield gateways[0]


async def phone(browser: Any, url: str, name: str) -> Person:
    context = await browser.new_context(viewport={"width": 375, "height": 740}, has_touch=True)
    person = Person(await context.new_page())
    await person.page.goto(url)
    await person.page.fill("#name", name)
    await person.page.click("#signin")
    await person.page.wait_for_selector("#status[data-state=online]", timeout=WAIT_MS)
    return person


async def test_markup_javascript_links_and_html_in_content_render_as_text(
    browser: Any, site: GatewayProc
) -> None:
    from playwright.async_api import expect

    alice = await sign_in(browser, f"{site.http_url}/", "alice")
    bob = await sign_in(browser, f"{site.http_url}/", "bob")
    try:
        await alice.page.fill("#composer", HOSTILE)
        await alice.page.press("#composer", "Enter")
        content = bob.page.locator('#message-list li[data-sender="alice"] [data-testid=content]')
        await expect(content).to_have_count(1, timeout=WAIT_MS)
        # The HTML is shown as the text it is, and made no element.
        await expect(content).to_contain_text('<img src=x onerror="window.__xss=1">')
        await expect(content).to_contain_text("<script>window.__xss=2</script>")
        assert await content.locator("img, script, b").count() == 0
        # One link: the http(s) one, safe; javascript: stays text.
        links = content.locator("a")
        await expect(links).to_have_count(1)
        assert await links.get_attribute("href") == "https://example.com/a?b=1"
        assert await links.get_attribute("rel") == "noopener noreferrer"
        await expect(links).to_have_text("https://example.com/a?b=1")
        await expect(content).to_contain_text("[click](javascript:window.__xss=3)")
        await expect(content.locator("strong")).to_have_text("bold")
        await expect(content.locator("em")).to_have_text("it")
        await expect(content.locator(":scope > code")).to_have_text("x<b>y</b>")
        await expect(content.locator("pre code")).to_have_text("<b>block</b>\n")
        await expect(content).to_contain_text("snake_case_name")  # no italic inside words
        await bob.page.click("#message-list a[href^='https://example.com']", modifiers=[])
        for person in (alice, bob):
            assert await person.page.evaluate("window.__xss") is None
            assert person.dialogs == [] and person.errors == []
    finally:
        for person in (alice, bob):
            await person.page.context.close()


async def test_edit_react_reply_delete_and_search_on_desktop_and_phone(
    browser: Any, site: GatewayProc
) -> None:
    from playwright.async_api import expect

    url = f"{site.http_url}/"
    alice = await sign_in(browser, url, "alice")
    bob = await phone(browser, url, "bob")
    try:
        await alice.say("first tyop")
        mine = alice.page.locator('#message-list li[data-sender="alice"]:not(.pending)')
        await expect(mine).to_have_count(1, timeout=WAIT_MS)
        await expect(mine).to_have_attribute("data-state", "acked", timeout=WAIT_MS)

        # Desktop: hover shows the actions; edit in place.
        await mine.hover()
        await mine.get_by_test_id("edit").click()
        await alice.page.get_by_test_id("edit-box").fill("first typo, fixed")
        await alice.page.get_by_test_id("edit-save").click()
        theirs = bob.page.locator('#message-list li[data-sender="alice"]')
        await expect(theirs.get_by_test_id("content")).to_contain_text(
            "first typo, fixed", timeout=WAIT_MS
        )
        await expect(theirs.get_by_test_id("edited")).to_be_visible()

        # Phone: no hover; the "⋯" menu opens the same actions.
        await theirs.get_by_test_id("message-menu").click()
        await theirs.get_by_test_id("react").click()
        await theirs.get_by_test_id("pick").first.click()
        await expect(mine.get_by_test_id("reaction")).to_have_text("👍 1", timeout=WAIT_MS)
        await theirs.get_by_test_id("message-menu").click()
        await theirs.get_by_test_id("reply").click()
        await expect(bob.page.get_by_test_id("reply-bar")).to_contain_text("Replying to alice")
        await bob.page.fill("#composer", "agreed entirely")
        await bob.page.get_by_test_id("send").click()  # on a touch screen Enter is a newline
        reply = alice.page.locator('#message-list li[data-sender="bob"]')
        await expect(reply.get_by_test_id("quote")).to_contain_text(
            "alice: first typo, fixed", timeout=WAIT_MS
        )

        # Search (from the phone): the hit jumps to the message in its thread.
        # (The archive may take a moment to have the reply: search again until it does.)
        await bob.page.fill("#search", "agreed")
        hit = bob.page.get_by_test_id("search-hit")

        async def found() -> bool:
            await bob.page.press("#search", "Enter")
            await bob.page.get_by_test_id("search-results").wait_for(timeout=WAIT_MS)
            return await hit.count() == 1

        await wait_until(found, "the reply is found", timeout=20, interval=0.5)
        await expect(hit.locator("mark")).to_have_text("agreed")
        await hit.locator("button").click()
        await expect(bob.page.locator("#message-list li[data-jumped]")).to_have_count(1)

        # Delete: two steps, then a tombstone everywhere.
        await mine.hover()
        await mine.get_by_test_id("delete").click()
        await mine.get_by_test_id("delete").click()
        await expect(theirs.get_by_test_id("tombstone")).to_be_visible(timeout=WAIT_MS)
        await expect(theirs).not_to_contain_text("first typo")
        await expect(reply.get_by_test_id("quote")).to_contain_text("a deleted message")
        for person in (alice, bob):
            assert person.errors == [], person.errors
    finally:
        for person in (alice, bob):
            await person.page.context.close()


async def test_a_search_result_far_back_is_shown_in_context_without_breaking_the_thread(
    browser: Any, site: GatewayProc, js: Any
) -> None:
    """A hit more pages back than the page fetches is shown with the messages around it
    (`history` with `around`), and the lobby's own list is left as one unbroken run."""
    from playwright.async_api import expect

    now = int(time.time() * 1000)

    def lobby(content: str, n: int) -> pb.ChatMessage:
        return pb.ChatMessage(
            id=ids.new_id(), room="lobby", sender="carol", content=content, ts_ms=now + n
        )

    needle = lobby("the needle is here", 0)
    await publish_chat(js, [needle])
    await publish_chat(js, [lobby(f"filler {n}", n) for n in range(1, 301)])
    alice = await sign_in(browser, f"{site.http_url}/", "alice")
    try:
        await alice.page.fill("#search", "needle")
        hit = alice.page.get_by_test_id("search-hit")

        async def found() -> bool:
            await alice.page.press("#search", "Enter")
            await alice.page.get_by_test_id("search-results").wait_for(timeout=WAIT_MS)
            return await hit.count() == 1

        await wait_until(found, "the archive has the needle", timeout=30, interval=0.5)
        await hit.locator("button").click()
        context = alice.page.get_by_test_id("context")
        marked = context.locator("li[data-jumped]")
        await expect(marked).to_have_count(1, timeout=WAIT_MS)
        await expect(marked).to_contain_text("the needle is here")
        # Half a page of what came after it (and before it, were there any).
        await expect(context.locator("li", has_text="filler 25")).to_have_count(1)
        assert await context.locator("li", has_text="filler 26").count() == 0
        # The thread itself did not take the far page in: no gap hides behind its top.
        assert await alice.page.locator(f'#message-list li[data-id="{needle.id}"]').count() == 0
        assert alice.errors == []
    finally:
        await alice.page.context.close()
