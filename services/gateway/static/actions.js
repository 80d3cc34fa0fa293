// Message actions (issue 14): edit, delete, react, reply on each message (hover actions on
// a desktop, a "⋯" menu on a touch or narrow screen), the "edited" marker, tombstones,
// reactions, the quoted parent of a reply, and the search box whose results jump to the
// message in its thread. Builds DOM with textContent only (never innerHTML).

import { renderRichText } from "./richtext.js";

export const EMOJI = ["👍", "👎", "❤️", "😂", "😮", "😢", "🎉", "👀"];
// History pages fetched looking for a search result in its thread; a result further back
// is shown in context instead (a `history` page `around` it), so the thread's own list
// stays one unbroken run up to the newest message.
const JUMP_PAGES_MAX = 4;

let api = null; // what app.js lends us: state, send, thread, refresh, openThread, el, notice
const mine = new Map(); // client_id -> what we asked (for errors)
let replyTo = null; // {id, sender, key}
let jumpTarget = null; // {key, id, pages}

export function initActions(hooks) {
  api = hooks;
  mountSearch();
}

// --- the message model --------------------------------------------------------------------

// Lifecycle fields of a message frame or a history entry (absent ones at their default).
export function lifecycleFields(raw) {
  const out = {
    reply_to: typeof raw.reply_to === "string" ? raw.reply_to : null,
    edited_at: typeof raw.edited_at === "number" ? raw.edited_at : null,
    deleted: raw.deleted === true,
    version: 0, // seq of the edit shown
    reactions: new Map(), // emoji -> Set of users
    reactionSeq: new Map(), // "user emoji" -> seq of the state shown
  };
  if (Array.isArray(raw.reactions)) {
    for (const r of raw.reactions) {
      if (typeof r?.emoji === "string" && Array.isArray(r.users)) out.reactions.set(r.emoji, new Set(r.users));
    }
  }
  return out;
}

function keyOfEvent(f, actor) {
  if (typeof f.room === "string") return `room:${f.room}`;
  const peer = actor === api.state.user ? f.to : actor;
  return typeof peer === "string" ? `dm:${peer}` : null;
}

function target(f, actor) {
  const key = keyOfEvent(f, actor);
  if (typeof f.seq === "number" && f.seq > api.state.maxSeq) api.state.maxSeq = f.seq;
  if (!key) return [null, null];
  return [key, api.thread(key).messages.get(f.id) || null];
}

export function onEdit(f) {
  const [key, m] = target(f, f.sender);
  if (!m || m.deleted || (f.seq && f.seq <= m.version)) return;
  m.content = String(f.content ?? "");
  m.edited_at = f.edited_at;
  m.version = f.seq || m.version;
  api.refresh(key);
}

export function onDelete(f) {
  const [key, m] = target(f, f.by);
  if (!m) return;
  m.deleted = true;
  m.content = "";
  m.reactions.clear();
  if (replyTo?.id === f.id) cancelReply();
  api.refresh(key);
}

export function onReaction(f) {
  const [key, m] = target(f, f.user);
  if (!m || m.deleted) return;
  const slot = `${f.user} ${f.emoji}`;
  if (f.seq && f.seq <= (m.reactionSeq.get(slot) || 0)) return;
  m.reactionSeq.set(slot, f.seq || 0);
  const users = m.reactions.get(f.emoji) || new Set();
  if (f.added) users.add(f.user);
  else users.delete(f.user);
  if (users.size) m.reactions.set(f.emoji, users);
  else m.reactions.delete(f.emoji);
  api.refresh(key);
}

// An error answering one of our edit/delete/react frames: true when it was ours.
export function onActionError(f) {
  if (!f.ref || !mine.has(f.ref)) return false;
  mine.delete(f.ref);
  const why = { forbidden: "You can only change your own messages.", not_found: "That message is gone.", edit_window_closed: "That message is too old to edit." };
  api.notice(why[f.code] || f.message || f.code);
  return true;
}

function ask(frame) {
  const client_id = crypto.randomUUID();
  mine.set(client_id, frame.type);
  if (!api.send({ ...frame, client_id })) api.notice("Not connected: try again in a moment.");
}

// --- rendering a message ------------------------------------------------------------------

export function contentNodes(m) {
  if (m.deleted) return [api.el("span", { class: "tombstone", text: "message deleted", dataset: { testid: "tombstone" } })];
  const nodes = [renderRichText(m.content)];
  if (m.edited_at) nodes.push(api.el("span", { class: "edited", title: new Date(m.edited_at).toLocaleString(), text: " (edited)", dataset: { testid: "edited" } }));
  return nodes;
}

function quoteNode(m, t) {
  const parent = t.messages.get(m.reply_to);
  const text = !parent ? "an earlier message" : parent.deleted ? "a deleted message" : `${parent.sender}: ${parent.content.slice(0, 120)}`;
  const quote = api.el("button", { type: "button", class: "quote link-button", dataset: { testid: "quote" }, text: `↪ ${text}` });
  quote.addEventListener("click", () => jumpTo(t.key, m.reply_to));
  return quote;
}

function reactionsNode(m) {
  const row = api.el("div", { class: "reactions", dataset: { testid: "reactions" } });
  for (const [emoji, users] of m.reactions) {
    const pressed = users.has(api.state.user);
    const chip = api.el("button", {
      type: "button",
      class: `reaction${pressed ? " pressed" : ""}`,
      "aria-pressed": String(pressed),
      title: [...users].sort().join(", "),
      text: `${emoji} ${users.size}`,
      dataset: { testid: "reaction", emoji },
    });
    chip.addEventListener("click", () => ask({ type: "react", id: m.id, emoji, remove: pressed }));
    row.append(chip);
  }
  return row;
}

function actionBar(m, t, li) {
  const bar = api.el("div", { class: "actions", role: "toolbar", "aria-label": "Message actions", dataset: { testid: "actions" } });
  const button = (label, testid, onclick) => {
    const b = api.el("button", { type: "button", class: "action", text: label, dataset: { testid } });
    b.addEventListener("click", (ev) => {
      ev.stopPropagation();
      onclick(b);
    });
    bar.append(b);
    return b;
  };
  button("Reply", "reply", () => startReply(m, t));
  const picker = api.el("div", { class: "picker", hidden: true, dataset: { testid: "picker" } });
  for (const emoji of EMOJI) {
    const b = api.el("button", { type: "button", class: "pick", text: emoji, "aria-label": `React ${emoji}`, dataset: { testid: "pick" } });
    b.addEventListener("click", () => {
      picker.hidden = true;
      ask({ type: "react", id: m.id, emoji, remove: m.reactions.get(emoji)?.has(api.state.user) === true });
    });
    picker.append(b);
  }
  button("React", "react", () => {
    picker.hidden = !picker.hidden;
  });
  if (m.sender === api.state.user) {
    button("Edit", "edit", () => startEdit(m, li));
    button("Delete", "delete", (b) => {
      // Two steps instead of a blocking confirm() dialog.
      if (b.dataset.armed) ask({ type: "delete", id: m.id });
      else {
        b.dataset.armed = "1";
        b.textContent = "Really delete?";
      }
    });
  }
  bar.append(picker);
  return bar;
}

// Called by app.js for each message node it builds.
export function decorate(li, m, t) {
  const body = li.querySelector(".body");
  if (!body) return;
  if (m.reply_to) body.prepend(quoteNode(m, t));
  if (m.deleted) {
    li.classList.add("deleted");
    return;
  }
  if (m.reactions.size) body.append(reactionsNode(m));
  const menu = api.el("button", { type: "button", class: "menu-toggle icon-button", "aria-label": "Message menu", "aria-expanded": "false", text: "⋯", dataset: { testid: "message-menu" } });
  menu.addEventListener("click", () => {
    const open = li.classList.toggle("menu-open");
    menu.setAttribute("aria-expanded", String(open));
  });
  li.append(menu, actionBar(m, t, li));
}

function startEdit(m, li) {
  const content = li.querySelector(".content");
  if (!content) return;
  const box = api.el("textarea", { class: "edit-box", rows: "2", dataset: { testid: "edit-box" } });
  box.value = m.content;
  const save = api.el("button", { type: "button", class: "primary", text: "Save", dataset: { testid: "edit-save" } });
  const cancel = api.el("button", { type: "button", class: "link-button", text: "Cancel" });
  const form = api.el("div", { class: "edit-form" }, box, save, cancel);
  content.replaceWith(form);
  box.focus();
  const done = () => api.refresh(li.closest("[data-thread]")?.dataset.thread || api.state.current);
  save.addEventListener("click", () => {
    if (box.value.trim() && box.value !== m.content) ask({ type: "edit", id: m.id, content: box.value });
    done();
  });
  cancel.addEventListener("click", done);
  box.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") done();
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      save.click();
    }
  });
}

// --- replies ------------------------------------------------------------------------------

function startReply(m, t) {
  replyTo = { id: m.id, sender: m.sender, key: t.key };
  let bar = document.getElementById("reply-bar");
  if (!bar) {
    bar = api.el("div", { id: "reply-bar", class: "reply-bar", dataset: { testid: "reply-bar" } });
    const form = document.getElementById("composer-form");
    form.parentNode.insertBefore(bar, form);
  }
  const cancel = api.el("button", { type: "button", class: "link-button", text: "Cancel", dataset: { testid: "reply-cancel" } });
  cancel.addEventListener("click", cancelReply);
  bar.replaceChildren(api.el("span", { text: `Replying to ${m.sender}` }), cancel);
  bar.hidden = false;
  document.getElementById("composer").focus();
}

function cancelReply() {
  replyTo = null;
  const bar = document.getElementById("reply-bar");
  if (bar) bar.hidden = true;
}

// The reply_to for a message about to be sent in thread `key` (then forgotten).
export function takeReplyTo(key) {
  if (!replyTo || replyTo.key !== key) return null;
  const id = replyTo.id;
  cancelReply();
  return id;
}

// --- search -------------------------------------------------------------------------------

function mountSearch() {
  const topbar = document.getElementById("topbar");
  if (!topbar || document.getElementById("search-form")) return;
  const input = api.el("input", { id: "search", type: "search", placeholder: "Search messages", "aria-label": "Search messages", maxlength: "200", dataset: { testid: "search" } });
  const form = api.el("form", { id: "search-form", class: "search-form", role: "search" }, input);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const query = input.value.trim();
    if (query) api.send({ type: "search", query, limit: 20 });
  });
  const status = document.getElementById("status");
  topbar.insertBefore(form, status ? status.nextSibling : null);
  const panel = api.el("section", { id: "search-results", class: "search-results", hidden: true, "aria-label": "Search results", dataset: { testid: "search-results" } });
  document.body.append(panel);
}

// Text with the matches (between the two marks) in <mark> elements.
function snippetNode(snippet, marks) {
  const node = api.el("div", { class: "snippet" });
  const [start, end] = marks;
  let rest = snippet;
  while (rest) {
    const i = rest.indexOf(start);
    if (i < 0) break;
    const j = rest.indexOf(end, i + 1);
    if (j < 0) break;
    node.append(document.createTextNode(rest.slice(0, i)), api.el("mark", { text: rest.slice(i + 1, j) }));
    rest = rest.slice(j + 1);
  }
  node.append(document.createTextNode(rest));
  return node;
}

export function onSearch(f) {
  const panel = document.getElementById("search-results");
  if (!panel) return;
  const marks = Array.isArray(f.marks) && f.marks.length === 2 ? f.marks : ["\ue000", "\ue001"];
  const close = api.el("button", { type: "button", class: "link-button", text: "Close", dataset: { testid: "search-close" } });
  close.addEventListener("click", () => {
    panel.hidden = true;
  });
  const list = api.el("ul", { class: "search-list" });
  for (const r of Array.isArray(f.results) ? f.results : []) {
    const key = r.room ? `room:${r.room}` : `dm:${r.sender === api.state.user ? r.to : r.sender}`;
    const where = r.room ? `#${r.room}` : `@${key.slice(3)}`;
    const item = api.el("li", { class: "search-hit", dataset: { testid: "search-hit", id: r.id } });
    const button = api.el("button", { type: "button", class: "link-button" }, api.el("span", { class: "where", text: `${where} · ${r.sender}` }), snippetNode(String(r.snippet || r.content || ""), marks));
    button.addEventListener("click", () => {
      panel.hidden = true;
      jumpTo(key, r.id);
    });
    item.append(button);
    list.append(item);
  }
  const heading = api.el("h2", { text: list.children.length ? `Results for “${f.query}”` : `Nothing found for “${f.query}”` });
  panel.replaceChildren(heading, close, list);
  panel.hidden = false;
}

// Open the thread and show the message: page back through history until it is loaded.
function jumpTo(key, id) {
  jumpTarget = { key, id, pages: 0 };
  api.openThread(key, false);
  continueJump();
}

// Called by app.js after every history page and thread render.
export function continueJump() {
  if (!jumpTarget || api.state.current !== jumpTarget.key) return;
  const t = api.thread(jumpTarget.key);
  const node = document.querySelector(`#message-list li[data-id="${CSS.escape(jumpTarget.id)}"]`);
  if (node) {
    jumpTarget = null;
    node.scrollIntoView({ block: "center" });
    node.classList.add("flash");
    node.dataset.jumped = "1";
    setTimeout(() => node.classList.remove("flash"), 2000);
    return;
  }
  if (!t.latestLoaded || t.loadingOlder) return; // a page is on its way: we are called again
  if (!t.hasMore || jumpTarget.pages >= JUMP_PAGES_MAX) {
    const { id } = jumpTarget;
    jumpTarget = null;
    const f = { type: "history", around: id, limit: 50 };
    if (t.kind === "room") f.room = t.name;
    else f.with = t.name;
    if (!api.send(f)) api.notice("Not connected: try the search again.", "info");
    return;
  }
  jumpTarget.pages += 1;
  api.loadOlder();
}

// The answer to a `history` with `around`: the messages around a search result, in the
// search panel, the result marked. "Open thread" goes back to the thread's newest page.
export function onContext(f) {
  const panel = document.getElementById("search-results");
  if (!panel) return;
  const key = f.room ? `room:${f.room}` : `dm:${f.with}`;
  const where = f.room ? `#${f.room}` : `@${f.with}`;
  const list = api.el("ol", { class: "search-list context-list", dataset: { testid: "context" } });
  let target = null;
  for (const raw of Array.isArray(f.messages) ? f.messages : []) {
    const m = { ...raw, ...lifecycleFields(raw), content: String(raw.content ?? "") };
    const when = new Date(Number(raw.ts) || 0).toLocaleString();
    const item = api.el(
      "li",
      { class: "search-hit", dataset: { id: String(raw.id), testid: "context-message" } },
      api.el("span", { class: "where", text: `${raw.sender} · ${when}` }),
      ...contentNodes(m),
    );
    if (raw.id === f.around) {
      item.classList.add("flash");
      item.dataset.jumped = "1";
      target = item;
    }
    list.append(item);
  }
  const open = api.el("button", { type: "button", class: "link-button", text: `Open ${where}` });
  open.addEventListener("click", () => {
    panel.hidden = true;
    api.openThread(key);
  });
  const close = api.el("button", { type: "button", class: "link-button", text: "Close" });
  close.addEventListener("click", () => {
    panel.hidden = true;
  });
  const heading = api.el("h2", { text: target ? `In ${where}` : `That message is gone from ${where}` });
  panel.replaceChildren(heading, open, close, list);
  panel.hidden = false;
  target?.scrollIntoView({ block: "center" });
}
