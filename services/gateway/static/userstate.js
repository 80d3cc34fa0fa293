// User state from the server (issue #13): rooms and DM threads that follow the user to
// every device, unread and mention badges that agree across devices, the "new messages"
// divider at the read marker, and the room browser.
//
// app.js owns the page; it calls install() once with what this module needs, then the
// hooks below. Counts: the welcome's `unread` is exact up to welcome.seq; after that the
// page adds live messages (seq > welcome.seq) from others, and a `read` frame (from any
// of the user's sessions) recounts a thread from the messages the page holds.

const READ_THROTTLE_MS = 200;
const ROOMS_PAGE = 50;

let api = null; // { state, thread, send, renderSidebar, openThread, joinRoom, rememberRooms, rememberDms, el, roomKey, dmKey }
let countedThrough = 0; // welcome.seq of the last welcome that carried counts
const readTimers = new Map(); // thread key -> timeout

export function install(deps) {
  api = deps;
  buildBrowser();
}

function syncedKey(user) {
  return `natschat.synced.${user || "_"}`;
}

// hello.rooms: the rooms remembered in this browser are only a hint for the first visit;
// once the server has held our state, it is the truth (a room left on another device
// must not come back from here).
export function helloRooms(rooms) {
  try {
    if (localStorage.getItem(syncedKey(api.state.user))) return [];
  } catch {
    // storage unavailable: send the hint
  }
  return rooms;
}

export function onWelcome(f) {
  const { state, thread, roomKey, dmKey } = api;
  if (!Array.isArray(f.unread)) return;
  try {
    localStorage.setItem(syncedKey(state.user), "1");
  } catch {
    // private mode: fine, the hint is harmless
  }
  countedThrough = typeof f.seq === "number" ? f.seq : 0;
  for (const e of f.unread) {
    if (!e || typeof e !== "object") continue;
    const key = typeof e.room === "string" ? roomKey(e.room) : typeof e.with === "string" ? dmKey(e.with) : null;
    if (!key) continue;
    if (key.startsWith("dm:")) state.dmPeers.add(key.slice(3));
    const t = thread(key);
    t.unread = key === state.current && !document.hidden ? 0 : num(e.unread);
    t.mentions = key === state.current && !document.hidden ? 0 : num(e.mentions);
    t.readSeq = Math.max(t.readSeq || 0, num(e.read_seq));
    t.lastSeq = Math.max(t.lastSeq || 0, num(e.last_seq));
    if (typeof e.read_id === "string") t.readId = e.read_id;
  }
  api.rememberDms();
  // Every DM thread we have, newest first (a new device shows them all).
  api.send({ type: "threads", limit: 200 });
  if (state.current && !document.hidden) markRead(thread(state.current));
}

function num(v) {
  return typeof v === "number" && v > 0 ? v : 0;
}

// A message arrived (live or replayed). Returns true when it is new to the counts: the
// welcome counted everything up to its seq.
export function counts(t, m) {
  if (typeof m.seq === "number") t.lastSeq = Math.max(t.lastSeq || 0, m.seq);
  const fresh = typeof m.seq !== "number" || m.seq > countedThrough;
  const fromOther = m.sender !== api.state.user;
  if (fresh && fromOther && t.key !== api.state.current && mentionsMe(m.content)) {
    t.mentions = (t.mentions || 0) + 1;
  }
  return fresh && (typeof m.seq !== "number" || m.seq > (t.readSeq || 0));
}

function mentionsMe(text) {
  const user = api.state.user;
  if (!user || typeof text !== "string") return false;
  const esc = user.replace(/[-]/g, "\\-");
  return new RegExp(`(^|[^a-z0-9_@.\\-])@${esc}(?![a-z0-9_\\-])`).test(text);
}

// The open thread is being looked at: mark it read up to its newest message.
export function markRead(t) {
  if (!t || document.hidden || !api.state.connected) return;
  const seq = t.lastSeq || 0;
  if (!seq || seq <= (t.readSeq || 0)) return;
  if (readTimers.has(t.key)) return;
  readTimers.set(
    t.key,
    setTimeout(() => {
      readTimers.delete(t.key);
      const upto = t.lastSeq || 0;
      if (upto <= (t.readSeq || 0)) return;
      const frame = { type: "read", seq: upto };
      if (t.kind === "room") frame.room = t.name;
      else frame.with = t.name;
      api.send(frame);
    }, READ_THROTTLE_MS),
  );
}

// Opening a thread: the divider goes where the marker was, then the thread is read.
export function opened(t) {
  t.dividerId = t.unread || t.mentions ? t.readId || "" : null;
  t.mentions = 0;
  markRead(t);
}

export function onRead(f) {
  const { thread, roomKey, dmKey } = api;
  const key = typeof f.room === "string" ? roomKey(f.room) : typeof f.with === "string" ? dmKey(f.with) : null;
  if (!key || typeof f.seq !== "number") return;
  const t = thread(key);
  if (f.seq <= (t.readSeq || 0)) return; // markers only move forward
  t.readSeq = f.seq;
  if (typeof f.id === "string") t.readId = f.id;
  // Recount from what this page holds: messages from others after the marker.
  let unread = 0;
  let mentions = 0;
  for (const m of t.messages.values()) {
    if (m.sender === api.state.user || typeof m.seq !== "number" || m.seq <= f.seq) continue;
    unread += 1;
    if (mentionsMe(m.content)) mentions += 1;
  }
  t.unread = Math.min(t.unread, unread);
  t.mentions = Math.min(t.mentions || 0, mentions);
  api.renderSidebar();
}

export function onMembership(f) {
  const { state } = api;
  if (typeof f.room !== "string") return;
  if (f.joined) state.rooms.add(f.room);
  else {
    state.rooms.delete(f.room);
    if (state.current === api.roomKey(f.room)) api.openThread(api.roomKey("lobby"), false);
  }
  api.rememberRooms();
  api.renderSidebar();
}

export function onThreads(f) {
  if (!Array.isArray(f.threads)) return;
  for (const t of f.threads) {
    if (t && typeof t.with === "string") {
      api.state.dmPeers.add(t.with);
      const th = api.thread(api.dmKey(t.with));
      th.lastSeq = Math.max(th.lastSeq || 0, num(t.last_seq));
      th.readSeq = Math.max(th.readSeq || 0, num(t.read_seq));
    }
  }
  api.rememberDms();
  api.renderSidebar();
}

export function onMention(f) {
  // The mention itself is counted from the message frame (same socket, same order);
  // this event is what other services (push notifications) consume.
  void f;
}

// Sidebar: a mention badge next to the unread one.
export function decorate(li, t, active) {
  const n = t && !active ? t.mentions || 0 : 0;
  const button = li.querySelector(".thread-button");
  let badge = li.querySelector(".mention-badge");
  if (n && !badge) {
    badge = api.el("span", { class: "mention-badge", "aria-hidden": "true", dataset: { testid: "mentions" } });
    button.append(badge);
  } else if (!n && badge) {
    badge.remove();
  }
  if (n) badge.textContent = n > 99 ? "@99+" : `@${n}`;
  li.classList.toggle("mentioned", n > 0);
}

// The "new messages" divider, before the first message from someone else after the
// marker the thread had when it was opened.
export function placeDivider(t) {
  const list = document.getElementById("message-list");
  list.querySelector("li.new-divider")?.remove();
  if (t.dividerId === null || t.dividerId === undefined) return;
  for (const li of list.querySelectorAll("li[data-id]")) {
    if (li.dataset.id > t.dividerId && li.dataset.sender !== api.state.user) {
      const divider = api.el(
        "li",
        { class: "new-divider", dataset: { testid: "new-divider" } },
        api.el("span", { text: "New messages" }),
      );
      list.insertBefore(divider, li);
      return;
    }
  }
}

// --- the room browser ------------------------------------------------------------------

let browser = null;
let browseAfter = "";
let browsePrefix = "";

function buildBrowser() {
  const { el } = api;
  const search = el("input", {
    type: "search",
    id: "browse-search",
    placeholder: "Search rooms by name…",
    "aria-label": "Search rooms by name",
    maxlength: "32",
    spellcheck: "false",
    autocapitalize: "none",
    dataset: { testid: "browse-search" },
  });
  search.addEventListener("input", () => requestRooms(search.value.trim().toLowerCase(), ""));
  const list = el("ul", { id: "browse-list", class: "browse-list", dataset: { testid: "browse-list" } });
  const more = el("button", { type: "button", id: "browse-more", class: "primary", text: "More rooms", hidden: true });
  more.addEventListener("click", () => requestRooms(browsePrefix, browseAfter));
  const close = el("button", { type: "button", class: "icon-button", "aria-label": "Close", text: "×" });
  const dialog = el(
    "dialog",
    { id: "browse", class: "browse", "aria-labelledby": "browse-h", dataset: { testid: "browse" } },
    el("div", { class: "browse-head" }, el("h2", { id: "browse-h", text: "Browse rooms" }), close),
    search,
    list,
    more,
  );
  close.addEventListener("click", () => dialog.close());
  document.body.append(dialog);
  const open = el("button", {
    type: "button",
    id: "browse-open",
    class: "browse-open",
    text: "Browse rooms",
    dataset: { testid: "browse-open" },
  });
  open.addEventListener("click", openBrowser);
  document.getElementById("join-form").after(open);
  browser = { dialog, list, more, search };
}

function openBrowser() {
  browser.search.value = "";
  if (!browser.dialog.open) browser.dialog.showModal();
  requestRooms("", "");
  browser.search.focus();
}

function requestRooms(prefix, after) {
  if (prefix && !/^[a-z0-9_-]*$/.test(prefix)) return;
  browsePrefix = prefix;
  const frame = { type: "rooms", limit: ROOMS_PAGE };
  if (prefix) frame.prefix = prefix;
  if (after) frame.after = after;
  else browser.list.replaceChildren();
  api.send(frame);
}

export function onRooms(f) {
  if (!browser || !Array.isArray(f.rooms)) return;
  const { el } = api;
  // Answers carry no request id: one for an older search may arrive after the list was
  // cleared for a newer one, so keep only names of the current search, each once.
  const listed = new Set([...browser.list.children].map((li) => li.dataset.room));
  for (const r of f.rooms) {
    if (!r || typeof r.name !== "string") continue;
    if (!r.name.startsWith(browsePrefix) || listed.has(r.name)) continue;
    listed.add(r.name);
    const joined = api.state.rooms.has(r.name);
    const action = el("button", {
      type: "button",
      class: "primary",
      text: joined ? "Open" : "Join",
      dataset: { testid: `browse-join-${r.name}` },
    });
    action.addEventListener("click", () => {
      browser.dialog.close();
      api.joinRoom(r.name);
    });
    const members = typeof r.members === "number" ? r.members : 0;
    const last = typeof r.last_ts === "number" ? ` · active ${new Date(r.last_ts).toLocaleString()}` : "";
    browser.list.append(
      el(
        "li",
        { dataset: { room: r.name, testid: `browse-room-${r.name}` } },
        el("span", { class: "thread-name", text: `# ${r.name}` }),
        el("span", { class: "muted small", text: `${members} member${members === 1 ? "" : "s"}${last}` }),
        action,
      ),
    );
    browseAfter = r.name;
  }
  browser.more.hidden = !f.has_more;
}
