"""The page's user state from the server (issue #13) in a real headless Chromium: two
browser contexts of one user agree on rooms, unread and mention badges; a new device
shows the server's rooms and DM threads; the "new messages" divider; the room browser.
Reuses test_page's module system (gateway, presence, archive) and browser."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from tests import test_page
from tests.system_fixtures import ChatSystem
from tests.test_page import WAIT_MS, axe_problems, close_all, new_person, unique, wait_for

pytestmark = pytest.mark.browser

browser = test_page.browser
system = test_page.system
axe_source = test_page.axe_source


def room_item(person: test_page.Person, room: str) -> Any:
    return person.page.locator(f'#rooms li[data-room="{room}"]')


async def directory_has(system: ChatSystem, prefix: str, rooms: int) -> bool:
    """Whether the archive's room directory lists `rooms` rooms of `prefix`, each with a member."""
    conn = await asyncpg.connect(system.database_url)
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM rooms r WHERE r.name LIKE $1 || '%' AND EXISTS "
            "(SELECT 1 FROM memberships m WHERE m.room = r.name AND m.member)",
            prefix,
        )
        return int(found) == rooms
    finally:
        await conn.close()


async def session_token(person: Any) -> str:
    """The token a signed-in page holds (what a guest's other device needs)."""
    return str(await person.page.evaluate("sessionStorage.getItem('natschat.token')"))


async def test_two_devices_of_one_user_agree_on_rooms_badges_and_the_divider(
    browser: Any, system: ChatSystem, axe_source: str
) -> None:
    from playwright.async_api import expect

    name, room = unique("ann"), unique("r")
    phone = await new_person(browser, system, name)
    laptop = await new_person(browser, system, name, token=await session_token(phone))
    bob = await new_person(browser, system)
    try:
        # Join on the phone: the laptop shows the room without a reload.
        await phone.join(room)
        await expect(room_item(laptop, room)).to_have_count(1, timeout=WAIT_MS)
        await bob.join(room)
        await phone.page.click('#rooms li[data-room="lobby"] .thread-button')
        for text in ("first", f"hey @{name}", "third"):
            await bob.say(text)
        for device in (phone, laptop):
            badge = room_item(device, room).get_by_test_id("unread")
            await expect(badge).to_have_text("3", timeout=WAIT_MS)
            await expect(room_item(device, room).get_by_test_id("mentions")).to_have_text("@1")
        assert await axe_problems(phone.page, axe_source) == []  # the mention badge reads
        # Read on the laptop: the phone's badges clear within a second.
        await laptop.page.click(f'#rooms li[data-room="{room}"] .thread-button')
        await expect(room_item(phone, room).get_by_test_id("unread")).to_have_count(0, timeout=1000)
        await expect(room_item(phone, room).get_by_test_id("mentions")).to_have_count(0)
        # Two more: the phone opens the room and the divider sits above the first new one.
        await laptop.page.click('#rooms li[data-room="lobby"] .thread-button')
        await bob.say("fourth")
        await bob.say("fifth")
        await expect(room_item(phone, room).get_by_test_id("unread")).to_have_text(
            "2", timeout=WAIT_MS
        )
        await phone.page.click(f'#rooms li[data-room="{room}"] .thread-button')
        await expect(phone.message(bob.name, "fifth")).to_have_count(1, timeout=WAIT_MS)
        after_divider = phone.page.locator(
            "#message-list li.new-divider + li[data-id]"
        ).get_by_test_id("content")
        await expect(after_divider).to_have_text("fourth", timeout=WAIT_MS)
        # The laptop's badge (it never opened the room since) clears from the phone's read.
        await expect(room_item(laptop, room).get_by_test_id("unread")).to_have_count(
            0, timeout=1000
        )
        for person in (phone, laptop, bob):
            assert not person.errors, person.errors
    finally:
        await close_all(phone, laptop, bob)


async def test_a_new_device_shows_the_servers_rooms_dm_threads_and_unread_counts(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    name, room = unique("cy"), unique("r")
    first = await new_person(browser, system, name)
    bob = await new_person(browser, system)
    try:
        await first.join(room)
        await bob.join(room)
        await bob.open_dm(name)
        await bob.say("psst")
        await expect(first.page.locator(f'#dms li[data-peer="{bob.name}"]')).to_have_count(
            1, timeout=WAIT_MS
        )
        token = await session_token(first)
        await first.context.close()
        await bob.page.click(f'#rooms li[data-room="{room}"] .thread-button')
        await bob.say("while you were away")
        # No localStorage of its own; the guest's token (a guest's devices share it).
        fresh = await new_person(browser, system, name, token=token)
        await expect(room_item(fresh, room)).to_have_count(1, timeout=WAIT_MS)
        await expect(room_item(fresh, room).get_by_test_id("unread")).to_have_text(
            "1", timeout=WAIT_MS
        )
        dm = fresh.page.locator(f'#dms li[data-peer="{bob.name}"]')
        await expect(dm.get_by_test_id("unread")).to_have_text("1", timeout=WAIT_MS)
        assert not fresh.errors, fresh.errors
        await fresh.context.close()
    finally:
        await close_all(bob)


async def test_the_room_browser_searches_by_prefix_and_joins(
    browser: Any, system: ChatSystem, axe_source: str
) -> None:
    from playwright.async_api import expect

    prefix = unique("zz")
    maker = await new_person(browser, system)
    visitor = await new_person(browser, system)
    try:
        for suffix in ("-alpha", "-beta"):
            await maker.join(prefix + suffix)
        # The directory is the archive's, written from the membership stream a moment after
        # the join: a search is a snapshot, so search once both rooms are in it.
        await wait_for(
            lambda: directory_has(system, prefix, 2), what=f"the archive to list {prefix}-*"
        )
        await visitor.page.click("#browse-open")
        await visitor.page.fill("#browse-search", prefix)
        rows = visitor.page.locator("#browse-list li")
        await expect(rows).to_have_count(2, timeout=WAIT_MS)
        await expect(rows.first).to_contain_text("1 member")
        problems = {}
        for theme in ("light", "dark"):
            if await visitor.page.get_attribute("html", "data-theme") != theme:
                await visitor.page.evaluate("document.getElementById('theme').click()")
            await expect(visitor.page.locator("html")).to_have_attribute("data-theme", theme)
            problems[theme] = await axe_problems(visitor.page, axe_source)
        assert {k: v for k, v in problems.items() if v} == {}
        await visitor.page.click(f'[data-testid="browse-join-{prefix}-beta"]')
        await expect(visitor.page.locator("#thread-title")).to_have_text(
            f"# {prefix}-beta", timeout=WAIT_MS
        )
        await expect(room_item(visitor, f"{prefix}-beta")).to_have_count(1)
        assert not visitor.errors, visitor.errors
    finally:
        await close_all(maker, visitor)
