"""The web page as people use it all day, in a real headless Chromium (issue 21).

One browser and one system (gateway, presence, archive on the session's NATS and
Postgres) for the whole module; each test signs in its own users, so tests do not see
each other's state. Screenshots go to tests/artifacts/ (ignored by git). axe-core comes
from npm (tests/browser/package.json, installed on first use) and is injected into the
page by the test.

The browser cannot hide a headless tab or show a desktop notification anyone can see, so
an init script (the same in every context) lets a test set `document.visibilityState` and
records the notifications the page creates (the real Notification still runs), and
counts mouse events for the keyboard-only test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from tests import test_browser
from tests.conftest import delete_all_streams
from tests.system_fixtures import ChatSystem
from tests.tcp_proxy import TcpProxy
from tests.test_browser import IN_CI

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
BROWSER_DEPS = ROOT / "tests" / "browser"
WAIT_MS = 15_000
SIZES = [(375, 740), (768, 1024), (1440, 900)]
_names = itertools.count(1)

INIT_SCRIPT = """
(() => {
  window.__mouse = [];
  for (const type of ["mousedown", "mouseup", "mousemove", "pointerdown", "pointerup", "wheel"]) {
    addEventListener(type, () => window.__mouse.push(type), true);
  }
  let visibility = "visible";
  const define = (name, get) =>
    Object.defineProperty(Document.prototype, name, { configurable: true, get });
  define("visibilityState", () => visibility);
  define("hidden", () => visibility === "hidden");
  window.__setVisibility = (value) => {
    visibility = value;
    document.dispatchEvent(new Event("visibilitychange"));
  };
  window.__notifications = [];
  const Real = window.Notification;
  if (Real) {
    window.Notification = class extends Real {
      constructor(title, options) {
        super(title, options);
        const { body, tag } = options || {};
        window.__notifications.push({ title, body, tag });
      }
    };
  }
})();
"""


def unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}-{uuid.uuid4().hex[:4]}"


# ---------------------------------------------------------------------------------------
# Fixtures: one browser, one system per module


browser = test_browser.browser  # the session's Chromium, under its name in this module


@pytest.fixture(scope="module")
async def system(
    nats_server: Any, pg_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ChatSystem]:
    nc = await nats.connect(nats_server.url)
    await delete_all_streams(nc)
    await nc.close()
    name = f"t_page_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server.url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    database_url = pg_server.url.rsplit("/", 1)[0] + f"/{name}"
    chat = ChatSystem(
        nats_urls=[nats_server.url],
        database_url=database_url,
        logs_dir=tmp_path_factory.mktemp("page-logs"),
        gateways=1,
        archives=1,
        presences=1,
    ).start()
    try:
        yield chat
    finally:
        chat.stop()
        admin = await asyncpg.connect(pg_server.url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="module")
def axe_source() -> str:
    """axe-core's browser bundle (npm, installed once into tests/browser/node_modules)."""
    bundle = BROWSER_DEPS / "node_modules" / "axe-core" / "axe.min.js"
    if not bundle.exists():
        if shutil.which("npm") is None:
            if IN_CI:
                pytest.fail("npm is needed for the axe-core accessibility checks in CI")
            pytest.skip("npm not installed: apt-get install npm")
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"],
            cwd=BROWSER_DEPS, check=True, capture_output=True, timeout=240,
        )  # fmt: skip
    return bundle.read_text()


def page_url(system: ChatSystem) -> str:
    return system.http_url("gateway-0") + "/"


# ---------------------------------------------------------------------------------------
# People


class Person(test_browser.Person):
    """test_browser's Person (page errors and dialogs recorded, `message`, `say`), named."""

    def __init__(self, name: str, page: Any) -> None:
        super().__init__(page)
        self.name = name

    @property
    def context(self) -> Any:
        return self.page.context

    async def join(self, room: str) -> None:
        from playwright.async_api import expect

        await self.page.fill("#join-room", room)
        await self.page.press("#join-room", "Enter")
        await expect(self.page.locator("#thread-title")).to_have_text(f"# {room}", timeout=WAIT_MS)

    async def open_dm(self, peer: str) -> None:
        from playwright.async_api import expect

        await self.page.click(f'#online li[data-user="{peer}"] button', timeout=WAIT_MS)
        await expect(self.page.locator("#thread-title")).to_have_text(f"@ {peer}")

    async def focused(self) -> str:
        """A description of the focused element: id, or tag + data hooks."""
        return str(
            await self.page.evaluate(
                """() => {
                  const a = document.activeElement;
                  if (!a || a === document.body) return "body";
                  const li = a.closest("li");
                  return a.id || `${a.tagName.toLowerCase()}.${a.className}` +
                    (li ? `@${li.dataset.room || li.dataset.peer || li.dataset.user || ""}` : "");
                }"""
            )
        )


async def new_person(
    browser: Any,
    system: ChatSystem,
    name: str | None = None,
    *,
    viewport: tuple[int, int] = (1100, 760),
    sign_in: bool = True,
    token: str | None = None,
    **context_options: Any,
) -> Person:
    """A person in a browser context of their own, signed in as `name` (a free guest
    name) or, with `token`, as the user of that token: another device of someone signed
    in already (a guest name is held by its first holder, so a second device of a guest
    carries the guest's token rather than asking for the name again)."""
    context = await browser.new_context(
        viewport={"width": viewport[0], "height": viewport[1]}, **context_options
    )
    await context.add_init_script(INIT_SCRIPT)
    person = Person(name or unique("u"), await context.new_page())
    if token is not None:
        seed = f"sessionStorage.setItem('natschat.token', {json.dumps(token)});"
        seed += f"sessionStorage.setItem('natschat.user', {json.dumps(person.name)});"
        await context.add_init_script(seed)
        await person.page.goto(page_url(system))
        await person.page.wait_for_selector("#status[data-state=online]", timeout=WAIT_MS)
        return person
    await person.page.goto(page_url(system))
    if sign_in:
        await person.page.fill("#name", person.name)
        await person.page.click("#signin")
        await person.page.wait_for_selector("#status[data-state=online]", timeout=WAIT_MS)
    return person


async def close_all(*people: Person) -> None:
    for person in people:
        await person.context.close()


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


async def submit_many(person: Person, texts: list[str]) -> None:
    """Submit each text from the composer, all within one task (well within a second)."""
    await person.page.evaluate(
        """(texts) => {
          const box = document.getElementById("composer");
          const form = document.getElementById("composer-form");
          for (const text of texts) { box.value = text; form.requestSubmit(); }
        }""",
        texts,
    )


async def archived_count(system: ChatSystem, sender: str) -> int:
    conn = await asyncpg.connect(system.database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM messages WHERE sender = $1", sender))
    finally:
        await conn.close()


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def axe_problems(page: Any, axe_source: str) -> list[str]:
    """axe-core violations of impact serious or critical, as readable lines."""
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.evaluate(axe_source)
    result = await page.evaluate(
        """async () => JSON.stringify(
             (await axe.run(document, {resultTypes: ['violations']})).violations)"""
    )
    out = []
    for v in json.loads(result):
        if v["impact"] in ("serious", "critical"):
            targets = [" ".join(map(str, n["target"])) for n in v["nodes"]][:5]
            out.append(f"{v['id']} ({v['impact']}): {v['help']} at {targets}")
    return out


async def overflowing(page: Any) -> list[str]:
    """Visible elements that stick out to the right of the viewport, and page-level
    horizontal scrolling."""
    return list(
        await page.evaluate(
            """() => {
              const out = [];
              const w = document.documentElement.clientWidth;
              const sw = document.documentElement.scrollWidth;
              if (sw > w + 1) out.push(`page scrolls: ${sw} > ${w}`);
              for (const node of document.querySelectorAll("body *")) {
                const r = node.getBoundingClientRect();
                if (!r.width || !r.height) continue;
                const s = getComputedStyle(node);
                if (s.visibility === "hidden") continue;
                const closed = !document.body.classList.contains("drawer-open");
                if (node.closest(".sidebar") && closed && r.right <= 1) continue;
                const name = `${node.tagName}#${node.id}.${node.className}`;
                if (r.right > w + 1) out.push(`${name} ${r.right}`);
              }
              return out.slice(0, 10);
            }"""
        )
    )


# ---------------------------------------------------------------------------------------
# Must hold: layout at three sizes, axe in both themes, keyboard only, offline + restart,
# title/favicon/notification while hidden.

LONG_WORD = "supercalifragilistic" * 12
RTL = "مرحبا بالعالم، هذه رسالة من اليمين إلى اليسار"


async def test_layout_holds_at_phone_tablet_and_desktop_sizes(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    alice = await new_person(browser, system, unique("alice"), viewport=SIZES[0])
    bob = await new_person(browser, system, unique("bob"))
    try:
        page = alice.page
        await bob.say("A message long enough to wrap on a phone, " * 6)
        await bob.say(LONG_WORD)
        await bob.say(RTL)
        await alice.say("and a reply from me")
        await expect(alice.message(bob.name, RTL)).to_have_count(1, timeout=WAIT_MS)
        for width, height in SIZES:
            await page.set_viewport_size({"width": width, "height": height})
            await page.wait_for_function(f"() => window.innerWidth === {width}")
            await page.screenshot(path=str(ARTIFACTS / f"page-{width}x{height}.png"))
            assert await overflowing(page) == [], (width, await overflowing(page))
            sizes = await page.evaluate(
                """() => {
                  const box = (sel) => document.querySelector(sel).getBoundingClientRect();
                  const style = (sel) => getComputedStyle(document.querySelector(sel));
                  const side = box("#sidebar");
                  return {
                    conversation: box("#conversation").width,
                    composer: box("#composer-form").width,
                    textarea: box("#composer").width,
                    sidebarVisible: side.right > 1 && style("#sidebar").visibility !== "hidden",
                    menuVisible: style("#menu").display !== "none",
                  };
                }"""
            )
            if width < 700:
                assert not sizes["sidebarVisible"], "the drawer is closed by default"
                assert sizes["menuVisible"]
                assert sizes["conversation"] >= 0.9 * width, sizes
                assert sizes["composer"] >= 0.9 * width, sizes
                assert sizes["textarea"] >= 0.6 * width, sizes  # no "Mess / age"
            else:
                assert sizes["sidebarVisible"] and not sizes["menuVisible"], sizes

        await page.click("#theme")  # and the other theme, to look at
        await expect(page.locator("html")).to_have_attribute("data-theme", "dark")
        await page.screenshot(path=str(ARTIFACTS / "page-1440x900-dark.png"))
        await page.click("#theme")

        # The drawer on a phone: opens from the menu button, keeps focus inside, Esc closes.
        await page.set_viewport_size({"width": 375, "height": 740})
        await page.wait_for_function("() => window.innerWidth === 375")
        await page.focus("#menu")
        await page.keyboard.press("Enter")
        await expect(page.locator("#menu")).to_have_attribute("aria-expanded", "true")
        await expect(page.locator("#sidebar")).to_be_in_viewport()
        await page.wait_for_function(  # the slide-in has finished
            "() => document.getElementById('sidebar').getBoundingClientRect().left === 0"
        )
        await page.screenshot(path=str(ARTIFACTS / "page-375x740-drawer.png"))
        for _ in range(25):
            await page.keyboard.press("Tab")
            inside = await page.evaluate(
                "() => document.getElementById('sidebar').contains(document.activeElement)"
            )
            assert inside, f"focus left the open drawer: {await alice.focused()}"
        await page.keyboard.press("Escape")
        await expect(page.locator("#menu")).to_have_attribute("aria-expanded", "false")
        assert await alice.focused() == "menu"
        # Picking a thread in the drawer closes it.
        await page.click("#menu")
        await page.click('#rooms li[data-room="lobby"] .thread-button')
        await expect(page.locator("#menu")).to_have_attribute("aria-expanded", "false")
        # Reduced motion: the drawer does not slide.
        slide = "() => getComputedStyle(document.getElementById('sidebar')).transitionDuration"
        assert await page.evaluate(slide) != "0s"
        await page.emulate_media(reduced_motion="reduce")
        assert await page.evaluate(slide) == "0s"
        assert alice.errors == [] and bob.errors == []
    finally:
        await close_all(alice, bob)


async def test_on_a_touch_phone_enter_is_a_new_line_send_sends_and_a_swipe_closes_the_drawer(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    alice = await new_person(
        browser, system, unique("alice"), viewport=SIZES[0], has_touch=True, is_mobile=True
    )
    try:
        page = alice.page
        assert await page.evaluate("() => matchMedia('(pointer: coarse)').matches")
        await page.tap("#composer")
        await page.keyboard.type("two")
        await page.keyboard.press("Enter")
        await page.keyboard.type("lines")
        assert await page.input_value("#composer") == "two\nlines"
        grown = await page.evaluate("() => document.getElementById('composer').offsetHeight")
        await page.tap("#send")
        await expect(alice.message(alice.name, "two\nlines")).to_have_attribute(
            "data-state", "acked", timeout=WAIT_MS
        )
        assert await page.input_value("#composer") == ""
        shrunk = await page.evaluate("() => document.getElementById('composer').offsetHeight")
        assert grown > shrunk  # it grew with its content, and shrinks back

        await page.tap("#menu")
        await expect(page.locator("#menu")).to_have_attribute("aria-expanded", "true")
        await page.evaluate(
            """() => {
              const side = document.getElementById("sidebar");
              const touch = (x) =>
                new Touch({ identifier: 1, target: side, clientX: x, clientY: 300 });
              const fire = (type, key, x) =>
                side.dispatchEvent(new TouchEvent(type, { [key]: [touch(x)], bubbles: true }));
              fire("touchstart", "touches", 250);
              fire("touchend", "changedTouches", 60);
            }"""
        )
        await expect(page.locator("#menu")).to_have_attribute("aria-expanded", "false")
        assert alice.errors == []
    finally:
        await close_all(alice)


async def test_axe_finds_nothing_serious_on_sign_in_room_and_dm_in_both_themes(
    browser: Any, system: ChatSystem, axe_source: str
) -> None:
    from playwright.async_api import expect

    problems: dict[str, list[str]] = {}
    for scheme in ("light", "dark"):
        visitor = await new_person(browser, system, sign_in=False, color_scheme=scheme)
        await expect(visitor.page.locator("html")).to_have_attribute("data-theme", scheme)
        problems[f"sign-in/{scheme}"] = await axe_problems(visitor.page, axe_source)
        await close_all(visitor)

    alice = await new_person(browser, system, unique("alice"))
    bob = await new_person(browser, system, unique("bob"))
    try:
        await bob.join("axe-room")
        await bob.say(f"hello @{alice.name}, this mentions you")
        await alice.open_dm(bob.name)
        await alice.say("a direct message")
        await bob.page.click('#rooms li[data-room="lobby"] .thread-button')
        await alice.page.click('#rooms li[data-room="lobby"] .thread-button')
        await alice.say("hi lobby")
        await bob.say("hi alice")
        await expect(alice.message(bob.name, "hi alice")).to_have_count(1, timeout=WAIT_MS)
        await expect(bob.page.locator(f'#dms li[data-peer="{alice.name}"] .badge')).to_be_visible()
        for theme in ("light", "dark"):
            if await bob.page.get_attribute("html", "data-theme") != theme:
                await bob.page.click("#theme")
            await expect(bob.page.locator("html")).to_have_attribute("data-theme", theme)
            problems[f"room/{theme}"] = await axe_problems(bob.page, axe_source)
            await bob.page.click(f'#dms li[data-peer="{alice.name}"] .thread-button')
            await expect(bob.message(alice.name, "a direct message")).to_have_count(1)
            problems[f"dm/{theme}"] = await axe_problems(bob.page, axe_source)
            await bob.page.click('#rooms li[data-room="lobby"] .thread-button')
        # The theme choice is remembered for this user.
        await bob.page.reload()
        await bob.page.wait_for_selector("#status[data-state=online]", timeout=WAIT_MS)
        assert await bob.page.get_attribute("html", "data-theme") == "dark"
    finally:
        await close_all(alice, bob)
    assert {k: v for k, v in problems.items() if v} == {}


async def tab_to(person: Person, wanted: str, limit: int = 60) -> None:
    """Press Tab until the focused element matches the CSS selector `wanted`."""
    for _ in range(limit):
        if await person.page.evaluate(f"() => document.activeElement.matches({wanted!r})"):
            return
        await person.page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached {wanted}; focus is on {await person.focused()}")


async def test_keyboard_only_sign_in_join_send_dm_and_scroll_back(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    bob = await new_person(browser, system, unique("bob"))
    room = unique("kb")
    await bob.join(room)
    # History to scroll back through: more than one page (50).
    await submit_many(bob, [f"old {i}" for i in range(70)])
    await expect(bob.page.locator("#message-list li.pending")).to_have_count(0, timeout=WAIT_MS)
    await wait_for(lambda: _equals(archived_count(system, bob.name), 70), what="70 archived")

    alice = await new_person(browser, system, unique("alice"), sign_in=False)
    page = alice.page
    try:
        await expect(page.locator("#name")).to_be_focused()
        await page.keyboard.type(alice.name)
        await page.keyboard.press("Enter")
        await page.wait_for_selector("#status[data-state=online]", timeout=WAIT_MS)

        await tab_to(alice, "#join-room")
        await page.keyboard.type(room)
        await page.keyboard.press("Enter")
        await expect(page.locator("#thread-title")).to_have_text(f"# {room}", timeout=WAIT_MS)
        await expect(page.locator("#composer")).to_be_focused()
        await page.keyboard.type("typed, not clicked")
        await page.keyboard.press("Enter")
        await expect(bob.message(alice.name, "typed, not clicked")).to_have_count(
            1, timeout=WAIT_MS
        )

        # Scroll back with the keyboard: the list is focusable; Home goes to the top and
        # the older page loads above.
        await expect(alice.message(bob.name, "old 69")).to_have_count(1, timeout=WAIT_MS)
        await tab_to(alice, "#messages")
        await page.keyboard.press("Home")
        await expect(alice.message(bob.name, "old 0")).to_have_count(1, timeout=WAIT_MS)
        # The older page went in above without moving what was being read.
        await expect(alice.message(bob.name, "old 20")).to_be_in_viewport()
        await expect(alice.message(bob.name, "old 0")).not_to_be_in_viewport()

        # Alt+Up/Down moves between threads.
        await page.keyboard.press("Alt+ArrowUp")
        await expect(page.locator("#thread-title")).not_to_have_text(f"# {room}")
        await page.keyboard.press("Alt+ArrowDown")
        await expect(page.locator("#thread-title")).to_have_text(f"# {room}")

        # Open a DM from the online list.
        await tab_to(alice, f'#online li[data-user="{bob.name}"] button')
        await page.keyboard.press("Enter")
        await expect(page.locator("#thread-title")).to_have_text(f"@ {bob.name}")
        await page.keyboard.type("dm by keyboard")
        await page.keyboard.press("Enter")
        badge = bob.page.locator(f'#dms li[data-peer="{alice.name}"] .badge')
        await expect(badge).to_have_text("1", timeout=WAIT_MS)

        assert await page.evaluate("() => window.__mouse") == []
        assert alice.errors == []
    finally:
        await close_all(alice, bob)


async def test_offline_then_gateway_restart_sends_the_queued_message_once_and_counts_recovered(
    browser: Any, system: ChatSystem
) -> None:
    """Also the bug "a dead connection shows connected": with the network gone the status
    must leave "connected" at once (the browser's offline event), not when the socket
    finally times out."""
    from playwright.async_api import expect

    alice = await new_person(browser, system, unique("alice"))
    bob = await new_person(browser, system, unique("bob"))
    gateway = system.procs["gateway-0"]
    try:
        await alice.context.set_offline(True)
        await expect(alice.page.locator("#status")).to_have_attribute(
            "data-state", "offline", timeout=10_000
        )
        await expect(alice.page.locator("#conn-bar")).to_contain_text("offline")
        await alice.say("typed while offline")
        mine = alice.page.locator("#message-list li.pending", has_text="typed while offline")
        await expect(mine).to_have_attribute("data-state", "waiting")

        gateway.terminate()
        gateway.start()
        await expect(bob.page.locator("#status")).to_have_attribute(
            "data-state", "online", timeout=30_000
        )
        for i in range(3):
            await bob.say(f"missed {i}")
        await expect(bob.page.locator("#message-list li.pending")).to_have_count(0, timeout=WAIT_MS)

        await alice.context.set_offline(False)
        await expect(alice.page.locator("#status")).to_have_attribute(
            "data-state", "online", timeout=WAIT_MS
        )
        await expect(bob.message(alice.name, "typed while offline")).to_have_count(
            1, timeout=WAIT_MS
        )
        await expect(alice.page.locator("#conn-bar")).to_have_attribute(
            "data-recovered", "3", timeout=WAIT_MS
        )
        await expect(alice.page.locator("#conn-text")).to_contain_text("3 messages recovered")
        for i in range(3):
            await expect(alice.message(bob.name, f"missed {i}")).to_have_count(1)
        acked = alice.page.locator(f'#message-list li[data-sender="{alice.name}"]:not(.pending)')
        await expect(acked.filter(has_text="typed while offline")).to_have_count(1)
        await expect(alice.page.locator("#message-list li.pending")).to_have_count(0)

        # Sent once: the archive (Postgres) holds it once, and no more after a while.
        async def archived() -> int:
            conn = await asyncpg.connect(system.database_url)
            try:
                return int(
                    await conn.fetchval(
                        "SELECT count(*) FROM messages WHERE sender = $1 AND content = $2",
                        alice.name,
                        "typed while offline",
                    )
                )
            finally:
                await conn.close()

        await wait_for(lambda: _equals(archived(), 1), what="the message in the archive")
        await alice.say("marker after")
        await expect(bob.message(alice.name, "marker after")).to_have_count(1, timeout=WAIT_MS)
        assert await archived() == 1
        await expect(bob.message(alice.name, "typed while offline")).to_have_count(1)
    finally:
        await close_all(alice, bob)


async def test_a_black_holed_socket_is_detected_by_ping_and_the_message_goes_once(
    browser: Any, system: ChatSystem
) -> None:
    """No offline event here: the path to the gateway silently drops everything (a dead
    Wi-Fi, a NAT that forgot us). The unanswered send makes the page ping; no pong within
    its timeout means a dead socket: it says so, reconnects and resends once."""
    from playwright.async_api import expect

    gateway = system.procs["gateway-0"]
    with TcpProxy(gateway.http_port) as proxy:
        bob = await new_person(browser, system, unique("bob"))
        context = await browser.new_context(viewport={"width": 1100, "height": 760})
        await context.add_init_script(INIT_SCRIPT)
        alice = Person(unique("alice"), await context.new_page())
        try:
            await alice.page.goto(f"http://127.0.0.1:{proxy.port}/")
            await alice.page.fill("#name", alice.name)
            await alice.page.click("#signin")
            await alice.page.wait_for_selector("#status[data-state=online]", timeout=WAIT_MS)
            proxy.stall()
            await alice.say("into the void")
            await expect(alice.page.locator("#status")).not_to_have_attribute(
                "data-state", "online", timeout=15_000
            )
            proxy.set_pass()
            await expect(alice.page.locator("#status")).to_have_attribute(
                "data-state", "online", timeout=30_000
            )
            await expect(bob.message(alice.name, "into the void")).to_have_count(1, timeout=WAIT_MS)
            await alice.say("and after")
            await expect(bob.message(alice.name, "and after")).to_have_count(1, timeout=WAIT_MS)
            await expect(bob.message(alice.name, "into the void")).to_have_count(1)
        finally:
            await close_all(alice, bob)


async def test_hidden_tab_gets_title_count_favicon_badge_and_a_notification_for_a_dm(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    alice = await new_person(browser, system, unique("alice"), permissions=["notifications"])
    bob = await new_person(browser, system, unique("bob"))
    try:
        page = alice.page
        # Off by default, and nothing asked on load.
        await expect(page.locator("#notify")).to_have_attribute("aria-pressed", "false")
        await page.click("#notify")
        await expect(page.locator("#notify")).to_have_attribute("aria-pressed", "true")
        await page.evaluate("() => window.__setVisibility('hidden')")

        await bob.say("a lobby message, no mention")
        await expect(page).to_have_title("(1) natschat", timeout=WAIT_MS)
        await bob.open_dm(alice.name)
        await bob.say("psst")
        await expect(page).to_have_title("(2) natschat", timeout=WAIT_MS)
        favicon = page.locator("#favicon")
        await expect(favicon).to_have_attribute("data-unread", "2")
        assert (await favicon.get_attribute("href") or "").startswith("data:image/png")
        await wait_for(
            lambda: page.evaluate("() => window.__notifications.length === 1"),
            what="a notification for the DM",
        )
        notes = await page.evaluate("() => window.__notifications")
        assert notes[0]["body"] == "psst" and bob.name in notes[0]["title"]
        # A mention in a room notifies too.
        await bob.page.click('#rooms li[data-room="lobby"] .thread-button')
        await bob.say(f"ping @{alice.name}")
        await expect(page).to_have_title("(3) natschat", timeout=WAIT_MS)
        await wait_for(
            lambda: page.evaluate("() => window.__notifications.length === 2"),
            what="a notification for the mention",
        )

        # Own messages never notify; coming back clears the count.
        await page.evaluate("() => window.__setVisibility('visible')")
        await expect(page).to_have_title("natschat")
        await expect(favicon).to_have_attribute("data-unread", "0")
        await alice.say("my own words")
        await expect(bob.message(alice.name, "my own words")).to_have_count(1, timeout=WAIT_MS)
        assert len(await page.evaluate("() => window.__notifications")) == 2
    finally:
        await close_all(alice, bob)


# ---------------------------------------------------------------------------------------
# The bugs, each with the test that failed before the fix


async def test_fast_sends_arrive_in_the_order_they_were_written(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    alice = await new_person(browser, system, unique("alice"))
    bob = await new_person(browser, system, unique("bob"))
    room = unique("flood")
    try:
        await alice.join(room)
        await bob.join(room)
        await submit_many(alice, [f"#{i}" for i in range(120)])
        got = bob.page.locator(
            f'#message-list li[data-sender="{alice.name}"] [data-testid=content]'
        )
        await expect(got).to_have_count(120, timeout=60_000)
        assert await got.all_text_contents() == [f"#{i}" for i in range(120)]
        await expect(alice.page.locator("#message-list li.pending")).to_have_count(0)
        # History (the archive) has the same order.
        await bob.page.reload()
        await bob.page.wait_for_selector("#status[data-state=online]", timeout=WAIT_MS)
        await bob.page.click(f'#rooms li[data-room="{room}"] .thread-button')
        await expect(got.last).to_have_text("#119", timeout=WAIT_MS)
        texts = await got.all_text_contents()
        assert texts == [f"#{i}" for i in range(120 - len(texts), 120)]

        # Reading comfort on the way: a day separator, and "jump to latest" with a count
        # when scrolled up.
        await expect(bob.page.locator("#message-list li.day").first).to_have_text("Today")
        await bob.page.evaluate("() => { document.getElementById('messages').scrollTop = 0; }")
        await alice.say("one more")
        await alice.say("and another")
        await expect(bob.page.locator("#jump")).to_contain_text("2 new messages", timeout=WAIT_MS)
        await bob.page.click("#jump")
        await expect(bob.page.locator("#jump")).to_be_hidden()
    finally:
        await close_all(alice, bob)


async def test_keyboard_focus_stays_put_when_messages_and_presence_change(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    alice = await new_person(browser, system, unique("alice"))
    bob = await new_person(browser, system, unique("bob"))
    carol = None
    try:
        await alice.join("dev")
        await alice.page.focus('#rooms li[data-room="dev"] .thread-button')
        before = await alice.focused()
        assert before.endswith("@dev"), before
        await bob.say("lobby news")
        badge = alice.page.locator('#rooms li[data-room="lobby"] .badge')
        await expect(badge).to_have_text("1", timeout=WAIT_MS)
        assert await alice.focused() == before
        carol = await new_person(browser, system, unique("carol"))
        await expect(alice.page.locator(f'#online li[data-user="{carol.name}"]')).to_be_visible(
            timeout=WAIT_MS
        )
        assert await alice.focused() == before
    finally:
        await close_all(alice, bob, *([carol] if carol else []))


async def test_the_lobby_offers_no_leave(browser: Any, system: ChatSystem) -> None:
    from playwright.async_api import expect

    alice = await new_person(browser, system, unique("alice"))
    try:
        await expect(alice.page.locator("#thread-title")).to_have_text("# lobby")
        await expect(alice.page.locator("#leave")).to_be_hidden()
        assert await alice.page.locator('#rooms li[data-room="lobby"] .leave-x').count() == 0
        await alice.join("side")
        await expect(alice.page.locator("#leave")).to_be_visible()
        await expect(alice.page.locator('#rooms li[data-room="side"] .leave-x')).to_have_count(1)
        await alice.page.click("#leave")
        await expect(alice.page.locator('#rooms li[data-room="side"]')).to_have_count(0)
        await expect(alice.page.locator("#thread-title")).to_have_text("# lobby")
    finally:
        await close_all(alice)


async def test_the_empty_thread_hint_goes_when_the_first_message_arrives(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    alice = await new_person(browser, system, unique("alice"))
    try:
        await alice.join(unique("quiet"))
        status = alice.page.locator("#history-status")
        await expect(status).to_have_text("No messages yet. Say hello!", timeout=WAIT_MS)
        await alice.say("hello?")
        await expect(alice.message(alice.name, "hello?")).to_have_attribute(
            "data-state", "acked", timeout=WAIT_MS
        )
        await expect(status).not_to_contain_text("No messages yet")
    finally:
        await close_all(alice)


async def test_a_too_long_message_shows_a_counter_not_a_toast(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    alice = await new_person(browser, system, unique("alice"))
    try:
        page = alice.page
        limit = await page.evaluate(
            "async () => (await (await fetch('/api/config')).json()).limits.max_content_bytes"
        )
        counter = page.locator("#counter")
        over = "é" * (limit // 2 + 1)  # 2 bytes each: over the limit by 2
        await page.fill("#composer", over)
        await page.press("#composer", "Enter")
        # No toast over the thread header: the counter beside the composer says it.
        assert await page.locator("#notice").is_hidden()
        await expect(counter).to_have_text("2 bytes too long")
        await expect(page.locator("#send")).to_be_disabled()
        assert await page.input_value("#composer") == over  # kept, to be shortened
        await page.fill("#composer", "x" * 10)
        await expect(counter).to_be_hidden()
        await expect(page.locator("#send")).to_be_enabled()
        await page.fill("#composer", "x" * (limit - 100))
        await expect(counter).to_have_text("100 bytes left")
        await expect(page.locator("#message-list li.pending")).to_have_count(0)
    finally:
        await close_all(alice)


async def test_room_and_dm_badges_line_up_and_the_leave_x_is_reachable_by_keyboard(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    alice = await new_person(browser, system, unique("alice"))
    bob = await new_person(browser, system, unique("bob"))
    try:
        await alice.join("ops")
        await bob.say("for the lobby")
        await bob.open_dm(alice.name)
        await bob.say("for alice")
        room_badge = alice.page.locator('#rooms li[data-room="lobby"] .badge')
        dm_badge = alice.page.locator(f'#dms li[data-peer="{bob.name}"] .badge')
        await expect(room_badge).to_have_text("1", timeout=WAIT_MS)
        await expect(dm_badge).to_have_text("1", timeout=WAIT_MS)
        room_box = await room_badge.bounding_box()
        dm_box = await dm_badge.bounding_box()
        assert room_box and dm_box
        assert abs(room_box["x"] + room_box["width"] - dm_box["x"] - dm_box["width"]) <= 2
        font = await room_badge.evaluate("(b) => parseFloat(getComputedStyle(b).fontSize)")
        assert font >= 12

        await alice.page.focus('#rooms li[data-room="ops"] .thread-button')
        await alice.page.keyboard.press("Tab")
        assert (await alice.focused()).startswith("button.leave-x@ops")
        x = alice.page.locator('#rooms li[data-room="ops"] .leave-x')
        assert await x.evaluate("(b) => getComputedStyle(b).opacity") == "1"
        await alice.page.keyboard.press("Enter")
        await expect(alice.page.locator('#rooms li[data-room="ops"]')).to_have_count(0)
    finally:
        await close_all(alice, bob)


async def test_rtl_text_runs_right_to_left_and_long_messages_fold(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    alice = await new_person(browser, system, unique("alice"))
    try:
        await alice.say(RTL)
        rtl = alice.message(alice.name, RTL).locator("[data-testid=content]")
        await expect(rtl).to_have_attribute("dir", "auto", timeout=WAIT_MS)
        assert await rtl.evaluate("(n) => getComputedStyle(n).direction") == "rtl"

        long_text = "\n".join(f"line {i} of a long paste" for i in range(60))
        await alice.page.fill("#composer", long_text)
        await alice.page.press("#composer", "Enter")
        item = alice.page.locator(f'#message-list li[data-sender="{alice.name}"]').last
        more = item.get_by_test_id("show-more")
        await expect(more).to_have_text("Show more", timeout=WAIT_MS)
        content = item.locator("[data-testid=content]")
        folded = await content.evaluate("(n) => n.getBoundingClientRect().height")
        await more.click()
        await expect(more).to_have_attribute("aria-expanded", "true")
        assert await content.evaluate("(n) => n.getBoundingClientRect().height") > folded * 2
    finally:
        await close_all(alice)


async def test_retry_now_reconnects_at_once_after_the_server_is_back(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    alice = await new_person(browser, system, unique("alice"))
    gateway = system.procs["gateway-0"]
    try:
        gateway.terminate()
        await expect(alice.page.locator("#status")).to_have_attribute(
            "data-state", "reconnecting", timeout=WAIT_MS
        )
        retry = alice.page.locator("#retry-now")
        await expect(retry).to_be_visible()
        # Let the backoff grow (several failed attempts) before the server comes back.
        await wait_for(
            lambda: alice.page.evaluate(
                "() => /Retrying in [4-9] s/.test(document.getElementById('conn-text').textContent)"
            ),
            timeout=30,
            what="a backoff of several seconds",
        )
        gateway.start()
        started = time.monotonic()
        await retry.click()
        await expect(alice.page.locator("#status")).to_have_attribute(
            "data-state", "online", timeout=5_000
        )
        assert time.monotonic() - started < 5
        await expect(retry).to_be_hidden()
    finally:
        await close_all(alice)


# ---------------------------------------------------------------------------------------
# Room members with presence (#15: static/members.js)


async def test_the_room_shows_its_members_and_their_presence(
    browser: Any, system: ChatSystem
) -> None:
    from playwright.async_api import expect

    room = unique("team")
    alice = await new_person(browser, system, unique("alice"))
    bob = await new_person(browser, system, unique("bob"))
    carol = await new_person(browser, system, unique("carol"))  # lobby only
    try:
        await bob.join(room)
        await alice.join(room)
        members = alice.page.locator("#members")
        await expect(alice.page.locator("#members-room")).to_have_text(f"#{room}")
        bob_item = members.locator(f'li[data-user="{bob.name}"]')
        await expect(bob_item).to_have_attribute("data-online", "true", timeout=WAIT_MS)
        await expect(members.locator(f'li[data-user="{alice.name}"]')).to_have_count(1)
        await expect(members.locator(f'li[data-user="{carol.name}"]')).to_have_count(0)
        # bob goes away: still a member, now offline (pushed, not asked again).
        await bob.context.close()
        await expect(bob_item).to_have_attribute("data-online", "false", timeout=WAIT_MS)
        await expect(alice.page.locator("#members-count")).to_have_text("1 / 2")
        # A DM (no room): no member list.
        await alice.open_dm(carol.name)
        await expect(alice.page.locator("#members-section")).to_be_hidden()
    finally:
        await close_all(alice, carol)
