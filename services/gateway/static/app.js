// natschat web page: sign in, then one WebSocket speaking protocol v1 (see the README).
// No framework and no build step. All user-supplied text goes into the DOM through
// textContent only, never innerHTML, so a message can never inject markup.

const PROTOCOL_VERSION = 1;
const TYPING_SHOW_MS = 4000; // how long a typing hint stays without a new typing frame
const TYPING_SEND_EVERY_MS = 2000; // throttle our own typing frames
const HISTORY_PAGE = 50;
const BACKOFF_MS = [300, 1000, 2000, 4000, 8000, 15000];
const PING_EVERY_MS = 25000;
const DEFAULT_ROOM = "lobby";
const NAME_RULE = /^[a-z0-9][a-z0-9_-]{0,31}$/;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------
// State

const state = {
  authMode: "guest",
  limits: null,
  token: null,
  user: null, // the server's word (welcome), not what we typed
  ws: null,
  connected: false,
  everConnected: false,
  reconnectAttempt: 0,
  reconnectTimer: null,
  pingTimer: null,
  maxSeq: 0, // highest CHAT sequence seen: sent as resume_seq
  seqKnown: false,
  rooms: new Set(), // rooms we are in
  dmPeers: new Set(),
  online: new Set(),
  threads: new Map(), // key -> Thread
  current: null, // key of the open thread
  pending: new Map(), // client_id -> {frame, key, status, error, ts, attempts}
  lastTypingSent: 0,
};

const roomKey = (room) => `room:${room}`;
const dmKey = (peer) => `dm:${peer}`;

function thread(key) {
  let t = state.threads.get(key);
  if (!t) {
    const [kind, ...rest] = key.split(":");
    t = {
      key,
      kind, // "room" | "dm"
      name: rest.join(":"),
      messages: new Map(), // id -> message
      order: [], // ids, oldest first (ids sort by time)
      unread: 0,
      historyRequested: false, // latest page asked for
      latestLoaded: false, // latest page received
      historyFailed: false, // last history request got history_unavailable
      loadingOlder: false,
      hasMore: true,
      typing: new Map(), // user -> timeout handle
    };
    state.threads.set(key, t);
  }
  return t;
}

function threadKeyOf(msg) {
  if (msg.room) return roomKey(msg.room);
  const peer = msg.sender === state.user ? msg.to : msg.sender;
  return dmKey(peer);
}

// ---------------------------------------------------------------------------------------
// Storage: the token lives for the tab (sessionStorage); rooms and DM peers are remembered
// per user across visits (localStorage).

const store = {
  get token() {
    return sessionStorage.getItem("natschat.token");
  },
  set token(v) {
    if (v) sessionStorage.setItem("natschat.token", v);
    else sessionStorage.removeItem("natschat.token");
  },
  get user() {
    return sessionStorage.getItem("natschat.user");
  },
  set user(v) {
    if (v) sessionStorage.setItem("natschat.user", v);
    else sessionStorage.removeItem("natschat.user");
  },
  list(kind, user) {
    try {
      const raw = JSON.parse(localStorage.getItem(`natschat.${kind}.${user || "_"}`) || "[]");
      return Array.isArray(raw) ? raw.filter((n) => typeof n === "string" && NAME_RULE.test(n)) : [];
    } catch {
      return [];
    }
  },
  saveList(kind, user, values) {
    localStorage.setItem(`natschat.${kind}.${user || "_"}`, JSON.stringify([...values].sort()));
  },
};

function rememberRooms() {
  store.saveList("rooms", state.user, state.rooms);
}

function rememberDms() {
  store.saveList("dms", state.user, state.dmPeers);
}

// The user a token names, best effort (for jwt mode, before the server says welcome): only
// used to find the remembered room list, never trusted for identity.
function tokenSubject(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part));
    return typeof claims.sub === "string" ? claims.sub : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------
// Small DOM helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

let noticeTimer = null;
function notice(text, kind = "error") {
  const box = $("notice");
  box.textContent = text;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (box.hidden = true), 5000);
}

function setStatus(kind, text) {
  const s = $("status");
  s.dataset.state = kind;
  s.textContent = text;
}

function avatarColor(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return `hsl(${h} 55% 45%)`;
}

function avatar(name) {
  const a = el("span", { class: "avatar", "aria-hidden": "true", text: name.slice(0, 1).toUpperCase() });
  a.style.background = avatarColor(name);
  return a;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dateFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

// ---------------------------------------------------------------------------------------
// Sign in

async function loadConfig() {
  try {
    const resp = await fetch("/api/config", { cache: "no-store" });
    if (resp.ok) {
      const cfg = await resp.json();
      state.authMode = cfg.auth_mode === "jwt" ? "jwt" : "guest";
      state.limits = cfg.limits || null;
    }
  } catch {
    // Offline or gateway down: guest form stays; signing in will report the problem.
  }
  const jwt = state.authMode === "jwt";
  $("guest-fields").hidden = jwt;
  $("jwt-fields").hidden = !jwt;
  $("signin-hint").textContent = jwt
    ? "Paste the access token your organisation gave you."
    : "Pick a name to chat as a guest.";
}

function showSigninError(text) {
  const e = $("signin-error");
  e.textContent = text;
  e.hidden = !text;
}

async function signIn(event) {
  event.preventDefault();
  showSigninError("");
  let token;
  let user = null;
  if (state.authMode === "jwt") {
    token = $("token").value.trim();
    if (!token) return showSigninError("Paste a token first.");
    user = tokenSubject(token);
  } else {
    const name = $("name").value.trim().toLowerCase();
    if (!NAME_RULE.test(name)) {
      return showSigninError("Names are 1–32 lowercase letters, digits, “-” or “_”, starting with a letter or digit.");
    }
    $("signin").disabled = true;
    try {
      const resp = await fetch("/api/guest", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ name }),
      });
      const body = await resp.json().catch(() => ({}));
      if (!resp.ok) {
        return showSigninError(body?.error?.message || `Sign-in failed (HTTP ${resp.status}).`);
      }
      token = body.token;
      user = body.user || name;
    } catch {
      return showSigninError("Cannot reach the server. Try again in a moment.");
    } finally {
      $("signin").disabled = false;
    }
  }
  store.token = token;
  store.user = user;
  startSession(token, user);
}

function startSession(token, user) {
  state.token = token;
  state.user = user;
  state.rooms = new Set(store.list("rooms", user));
  state.rooms.add(DEFAULT_ROOM);
  state.dmPeers = new Set(store.list("dms", user));
  $("signin-view").hidden = true;
  $("chat-view").hidden = false;
  renderSidebar();
  openThread(state.current || roomKey(DEFAULT_ROOM));
  connect();
}

function signOut(reasonText) {
  store.token = null;
  store.user = null;
  state.token = null;
  clearTimeout(state.reconnectTimer);
  clearInterval(state.pingTimer);
  if (state.ws) {
    const ws = state.ws;
    state.ws = null;
    ws.close(1000, "sign out");
  }
  state.connected = false;
  state.everConnected = false;
  state.maxSeq = 0;
  state.seqKnown = false;
  state.threads.clear();
  state.pending.clear();
  state.online.clear();
  state.current = null;
  $("message-list").replaceChildren();
  $("chat-view").hidden = true;
  $("signin-view").hidden = false;
  $("me-box").hidden = true;
  setStatus("signed-out", "signed out");
  showSigninError(reasonText || "");
  $(state.authMode === "jwt" ? "token" : "name").focus();
}

// ---------------------------------------------------------------------------------------
// Connection: connect, hello, reconnect with backoff, resume.

function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/ws`;
}

function connect() {
  clearTimeout(state.reconnectTimer);
  if (!state.token) return;
  setStatus(state.everConnected ? "reconnecting" : "connecting",
            state.everConnected ? "reconnecting…" : "connecting…");
  const ws = new WebSocket(wsUrl());
  state.ws = ws;
  ws.addEventListener("open", () => {
    if (state.ws !== ws) return;
    const hello = { type: "hello", v: PROTOCOL_VERSION, token: state.token, rooms: [...state.rooms] };
    // After a first welcome we know where we are in the log (possibly 0 for an empty one).
    if (state.seqKnown) hello.resume_seq = state.maxSeq;
    ws.send(JSON.stringify(hello));
  });
  ws.addEventListener("message", (ev) => {
    if (state.ws !== ws) return;
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (frame && typeof frame === "object") handleFrame(frame);
  });
  ws.addEventListener("close", (ev) => {
    if (state.ws !== ws) return; // a socket we already replaced or closed on purpose
    state.ws = null;
    state.connected = false;
    clearInterval(state.pingTimer);
    markPendingWaiting();
    forgetInflightHistory();
    if (ev.code === 4401) {
      signOut("Your session is no longer valid. Please sign in again.");
      return;
    }
    scheduleReconnect();
  });
}

function scheduleReconnect() {
  const base = BACKOFF_MS[Math.min(state.reconnectAttempt, BACKOFF_MS.length - 1)];
  state.reconnectAttempt += 1;
  const delay = base / 2 + Math.random() * base; // jitter so a fleet does not reconnect at once
  setStatus("reconnecting", "reconnecting…");
  state.reconnectTimer = setTimeout(connect, delay);
}

function send(frame) {
  if (!state.connected || !state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(frame));
  return true;
}

// ---------------------------------------------------------------------------------------
// Frames from the server

function handleFrame(f) {
  switch (f.type) {
    case "welcome":
      return onWelcome(f);
    case "resumed":
      return onResumed(f);
    case "joined":
      return onJoined(f.room);
    case "left":
      return onLeft(f.room);
    case "message":
      return onMessage(f, true);
    case "ack":
      return onAck(f);
    case "history":
      return onHistory(f);
    case "presence":
      return onPresence(f.user, f.online);
    case "typing":
      return onTyping(f);
    case "error":
      return onError(f);
    case "pong":
      return;
    default:
      return; // newer server, older page: ignore what we do not know
  }
}

function onWelcome(f) {
  const firstTime = !state.everConnected;
  state.connected = true;
  state.everConnected = true;
  state.reconnectAttempt = 0;
  if (f.user && f.user !== state.user) {
    state.user = f.user;
    store.user = f.user;
  }
  if (Array.isArray(f.rooms)) {
    state.rooms = new Set(f.rooms);
    rememberRooms();
  }
  state.online = new Set(Array.isArray(f.online) ? f.online : []);
  if (state.user) state.online.add(state.user); // we are connected, so we are online
  // A first connection starts live from here; history pages fill in what came before.
  if (!state.seqKnown && typeof f.seq === "number") {
    state.maxSeq = Math.max(state.maxSeq, f.seq);
    state.seqKnown = true;
  }
  setStatus("online", "connected");
  $("me").textContent = state.user;
  $("me-avatar").replaceWith(Object.assign(avatar(state.user), { id: "me-avatar" }));
  $("me-box").hidden = false;
  clearInterval(state.pingTimer);
  state.pingTimer = setInterval(() => send({ type: "ping" }), PING_EVERY_MS);
  if (state.current && state.current.startsWith("room:") && !state.rooms.has(state.current.slice(5))) {
    state.current = null;
  }
  renderSidebar();
  if (firstTime || !state.current) openThread(state.current || roomKey(DEFAULT_ROOM));
  else ensureHistory(thread(state.current));
  retryPending();
}

function onResumed(f) {
  if (f.complete === false) {
    // More was missed than the server replays: refetch the latest pages lazily.
    for (const t of state.threads.values()) {
      t.historyRequested = false;
      t.latestLoaded = false;
    }
    if (state.current) ensureHistory(thread(state.current));
    notice("Some older messages were not replayed; they are loaded from history.", "info");
  }
}

function onJoined(room) {
  if (!room) return;
  state.rooms.add(room);
  rememberRooms();
  renderSidebar();
  if (joinWanted === room) {
    joinWanted = null;
    openThread(roomKey(room));
  }
}

function onLeft(room) {
  if (!room) return;
  state.rooms.delete(room);
  rememberRooms();
  const key = roomKey(room);
  state.threads.delete(key);
  if (state.current === key) openThread(roomKey(state.rooms.has(DEFAULT_ROOM) ? DEFAULT_ROOM : [...state.rooms][0] || DEFAULT_ROOM));
  renderSidebar();
}

function normalizeMessage(m) {
  if (!m || typeof m.id !== "string" || typeof m.sender !== "string") return null;
  return {
    id: m.id,
    seq: typeof m.seq === "number" ? m.seq : null,
    room: typeof m.room === "string" && m.room ? m.room : null,
    to: typeof m.to === "string" && m.to ? m.to : null,
    sender: m.sender,
    content: typeof m.content === "string" ? m.content : String(m.content ?? ""),
    ts: typeof m.ts === "number" ? m.ts : Date.now(),
    client_id: typeof m.client_id === "string" ? m.client_id : null,
  };
}

function onMessage(raw, live) {
  const m = normalizeMessage(raw);
  if (!m) return;
  if (m.seq && m.seq > state.maxSeq) state.maxSeq = m.seq;
  const key = threadKeyOf(m);
  if (!key || key === "dm:null") return;
  if (key.startsWith("dm:") && !state.dmPeers.has(key.slice(3))) {
    state.dmPeers.add(key.slice(3));
    rememberDms();
  }
  const t = thread(key);
  // Our own message coming back: it is durable, so the "sending" bubble becomes the real one.
  if (m.client_id && m.sender === state.user && state.pending.has(m.client_id)) {
    resolvePending(m.client_id);
  }
  if (!addMessage(t, m)) return; // duplicate (resume replay, history overlap, other session)
  if (live && key !== state.current && m.sender !== state.user) {
    t.unread += 1;
  }
  if (live && m.sender !== state.user) clearTyping(t, m.sender);
  if (key === state.current) insertMessageNode(t, m, live);
  renderSidebar();
}

// Returns false when the message was already known.
function addMessage(t, m) {
  if (t.messages.has(m.id)) return false;
  t.messages.set(m.id, m);
  // ids sort by time: keep `order` sorted, the common case being an append.
  let i = t.order.length;
  while (i > 0 && t.order[i - 1] > m.id) i -= 1;
  t.order.splice(i, 0, m.id);
  return true;
}

function onAck(f) {
  const p = state.pending.get(f.client_id);
  if (!p) return;
  // maxSeq is not raised from an ack: the ack can overtake the message frame, and a resume
  // must still replay that message if the socket drops in between.
  p.id = f.id;
  const t = thread(p.key);
  if (f.id && t.messages.has(f.id)) {
    resolvePending(f.client_id);
    return;
  }
  // Acked but the message frame has not arrived yet: show it as sent already.
  p.status = "acked";
  p.ts = f.ts || p.ts;
  updatePendingNode(f.client_id);
}

function onHistory(f) {
  const key = f.room ? roomKey(f.room) : f.with ? dmKey(f.with) : null;
  if (!key) return;
  const t = thread(key);
  t.loadingOlder = false;
  t.historyFailed = false;
  t.latestLoaded = true;
  t.historyRequested = true;
  t.hasMore = Boolean(f.has_more);
  const list = Array.isArray(f.messages) ? f.messages : [];
  const added = [];
  for (const raw of list) {
    const m = normalizeMessage(raw);
    if (!m) continue;
    if (!m.room && !m.to) {
      if (f.room) m.room = f.room;
      else m.to = m.sender === state.user ? f.with : state.user;
    }
    if (m.client_id && state.pending.has(m.client_id)) resolvePending(m.client_id);
    if (addMessage(t, m)) added.push(m);
  }
  if (key === state.current) {
    const box = $("messages");
    const fromBottom = box.scrollHeight - box.scrollTop;
    const firstLoad = $("message-list").children.length === 0;
    renderMessages(t);
    if (firstLoad || !list.length) scrollToBottom();
    else box.scrollTop = box.scrollHeight - fromBottom; // keep the reader's place
    updateHistoryStatus(t);
  }
}

function onPresence(user, online) {
  if (typeof user !== "string") return;
  if (online) state.online.add(user);
  else if (user !== state.user || !state.connected) state.online.delete(user);
  renderSidebar();
}

function onTyping(f) {
  const user = f.user || f.from;
  if (!user || user === state.user) return;
  const key = f.room ? roomKey(f.room) : dmKey(f.from);
  const t = thread(key);
  clearTimeout(t.typing.get(user));
  t.typing.set(user, setTimeout(() => clearTyping(t, user), TYPING_SHOW_MS));
  if (key === state.current) renderTyping(t);
}

function clearTyping(t, user) {
  if (!t.typing.has(user)) return;
  clearTimeout(t.typing.get(user));
  t.typing.delete(user);
  if (t.key === state.current) renderTyping(t);
}

const RETRYABLE = new Set(["send_failed", "rate_limited"]);

function onError(f) {
  const p = f.ref ? state.pending.get(f.ref) : null;
  if (p) {
    if (RETRYABLE.has(f.code) && p.attempts < 6) {
      // Not durable yet: same client_id again, so the server can dedupe if it got through.
      p.status = "sending";
      updatePendingNode(f.ref);
      setTimeout(() => resend(f.ref), 500 * 2 ** p.attempts);
    } else {
      p.status = "failed";
      p.error = f.message || f.code;
      updatePendingNode(f.ref);
    }
    return;
  }
  if (f.code === "unauthorized") return; // the 4401 close that follows signs us out
  if (f.ref === "join" || f.code === "bad_room") joinWanted = null;
  if (f.ref === "history" || f.code === "history_unavailable") {
    // Shown in the thread (with a retry), not as a toast: it is about that thread.
    for (const t of state.threads.values()) {
      if (!t.loadingOlder) continue;
      t.loadingOlder = false;
      t.historyFailed = true;
      if (!t.latestLoaded) t.historyRequested = false;
    }
    if (state.current) updateHistoryStatus(thread(state.current));
    return;
  }
  if (f.code === "presence_unavailable") {
    notice("Who is online is unknown right now.", "info");
    return;
  }
  notice(f.message || f.code || "Something went wrong.");
}

// ---------------------------------------------------------------------------------------
// Sending with per-message state: sending -> acked (or failed, click to retry)

function sendMessage(text) {
  const key = state.current;
  if (!key || !text.trim()) return;
  const t = thread(key);
  const limit = state.limits?.max_content_bytes;
  if (limit && new TextEncoder().encode(text).length > limit) {
    notice(`Message too long (max ${limit} bytes).`);
    return false;
  }
  const client_id = crypto.randomUUID();
  const frame =
    t.kind === "room"
      ? { type: "send", room: t.name, content: text, client_id }
      : { type: "dm", to: t.name, content: text, client_id };
  state.pending.set(client_id, { frame, key, status: "sending", ts: Date.now(), attempts: 0, id: null });
  appendPendingNode(client_id);
  resend(client_id);
  return true;
}

function resend(client_id) {
  const p = state.pending.get(client_id);
  if (!p || p.status === "acked") return;
  p.attempts += 1;
  if (!send(p.frame)) {
    p.status = "waiting"; // goes out after reconnect, in retryPending
    updatePendingNode(client_id);
  }
}

function retryPending() {
  for (const [client_id, p] of state.pending) {
    if (p.status === "waiting" || p.status === "sending") {
      p.status = "sending";
      p.attempts = 0;
      updatePendingNode(client_id);
      resend(client_id);
    }
  }
}

function markPendingWaiting() {
  for (const [client_id, p] of state.pending) {
    if (p.status === "sending") {
      p.status = "waiting";
      updatePendingNode(client_id);
    }
  }
}

// History requests die with their socket: ask again after the reconnect.
function forgetInflightHistory() {
  for (const t of state.threads.values()) {
    if (!t.loadingOlder) continue;
    t.loadingOlder = false;
    if (!t.latestLoaded) t.historyRequested = false;
  }
  if (state.current) updateHistoryStatus(thread(state.current));
}

function resolvePending(client_id) {
  state.pending.delete(client_id);
  const node = document.querySelector(`li.pending[data-client-id="${CSS.escape(client_id)}"]`);
  if (node) node.remove();
}

// ---------------------------------------------------------------------------------------
// Threads: open, join, leave, history

let joinWanted = null;

function openThread(key) {
  state.current = key;
  const t = thread(key);
  t.unread = 0;
  $("thread-title").textContent = t.kind === "room" ? `# ${t.name}` : `@ ${t.name}`;
  $("thread-title").dataset.thread = key;
  $("leave").hidden = t.kind !== "room";
  $("composer").placeholder = t.kind === "room" ? `Message #${t.name}` : `Message ${t.name}`;
  renderMessages(t);
  scrollToBottom();
  renderTyping(t);
  renderSidebar();
  ensureHistory(t);
  updateHistoryStatus(t);
  $("composer").focus();
}

function historyFrame(t, before) {
  const f = { type: "history", limit: HISTORY_PAGE };
  if (t.kind === "room") f.room = t.name;
  else f.with = t.name;
  if (before) f.before = before;
  return f;
}

function ensureHistory(t) {
  if (t.historyRequested) return;
  if (send(historyFrame(t))) {
    t.historyRequested = true;
    t.loadingOlder = true;
    updateHistoryStatus(t);
  }
}

function loadOlder() {
  if (!state.current) return;
  const t = thread(state.current);
  if (t.loadingOlder || !t.hasMore || !t.historyRequested) return;
  const oldest = t.order[0];
  if (!oldest) return;
  if (send(historyFrame(t, oldest))) {
    t.loadingOlder = true;
    updateHistoryStatus(t);
  }
}

function retryHistory() {
  if (!state.current) return;
  const t = thread(state.current);
  t.historyFailed = false;
  if (t.latestLoaded) loadOlder();
  else ensureHistory(t);
  updateHistoryStatus(t);
}

function joinRoom(name) {
  const room = name.trim().replace(/^#/, "").toLowerCase();
  if (!NAME_RULE.test(room)) {
    notice("Room names are 1–32 lowercase letters, digits, “-” or “_”.");
    return;
  }
  if (state.rooms.has(room)) {
    openThread(roomKey(room));
    return;
  }
  joinWanted = room;
  if (!send({ type: "join", room })) notice("Not connected; try again when reconnected.");
}

function leaveRoom(room) {
  if (!send({ type: "leave", room })) notice("Not connected; try again when reconnected.");
}

function openDm(peer) {
  if (!peer || peer === state.user) return;
  if (!state.dmPeers.has(peer)) {
    state.dmPeers.add(peer);
    rememberDms();
  }
  openThread(dmKey(peer));
}

// ---------------------------------------------------------------------------------------
// Rendering

function renderSidebar() {
  const roomsUl = $("rooms");
  roomsUl.replaceChildren(
    ...[...state.rooms].sort().map((room) => threadItem(roomKey(room), `# ${room}`, room, "room")),
  );
  const dmsUl = $("dms");
  dmsUl.replaceChildren(
    ...[...state.dmPeers].sort().map((peer) => threadItem(dmKey(peer), peer, peer, "dm")),
  );
  $("dms-empty").hidden = state.dmPeers.size > 0;
  const onlineUl = $("online");
  const users = [...state.online].sort();
  onlineUl.replaceChildren(
    ...users.map((user) => {
      const me = user === state.user;
      const button = el(
        "button",
        {
          type: "button",
          class: "user-button",
          title: me ? "This is you" : `Message ${user}`,
          disabled: me,
          onclick: () => openDm(user),
        },
        avatar(user),
        el("span", { class: "user-name", text: user }),
        me ? el("span", { class: "you", text: "you" }) : null,
      );
      return el("li", { dataset: { user, testid: `online-${user}` } }, button);
    }),
  );
  $("online-count").textContent = String(users.length);
}

function threadItem(key, label, name, kind) {
  const t = state.threads.get(key);
  const unread = t && key !== state.current ? t.unread : 0;
  const button = el(
    "button",
    { type: "button", class: "thread-button", onclick: () => openThread(key) },
    kind === "dm" ? presenceDot(name) : null,
    el("span", { class: "thread-name", text: label }),
    unread ? el("span", { class: "badge", text: unread > 99 ? "99+" : String(unread), dataset: { testid: "unread" } }) : null,
  );
  const li = el("li", { class: key === state.current ? "active" : "", dataset: { key, testid: `${kind}-${name}` } }, button);
  if (kind === "room") {
    li.dataset.room = name;
    li.append(
      el("button", {
        type: "button",
        class: "leave-x",
        title: `Leave #${name}`,
        "aria-label": `Leave ${name}`,
        text: "×",
        dataset: { testid: `leave-${name}` },
        onclick: () => leaveRoom(name),
      }),
    );
  } else {
    li.dataset.peer = name;
  }
  return li;
}

function presenceDot(user) {
  const on = state.online.has(user);
  return el("span", { class: `dot ${on ? "on" : "off"}`, title: on ? "online" : "offline" });
}

function renderMessages(t) {
  const list = $("message-list");
  const nodes = [];
  let prev = null;
  for (const id of t.order) {
    const m = t.messages.get(id);
    nodes.push(messageNode(m, prev));
    prev = m;
  }
  for (const [client_id, p] of state.pending) {
    if (p.key === t.key) nodes.push(pendingNode(client_id, p));
  }
  list.replaceChildren(...nodes);
}

function insertMessageNode(t, m, live) {
  const box = $("messages");
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const idx = t.order.indexOf(m.id);
  const list = $("message-list");
  const prev = idx > 0 ? t.messages.get(t.order[idx - 1]) : null;
  const node = messageNode(m, prev);
  const nextId = t.order[idx + 1];
  const next = nextId ? list.querySelector(`li[data-id="${CSS.escape(nextId)}"]`) : null;
  const firstPending = list.querySelector("li.pending");
  list.insertBefore(node, next || firstPending || null);
  if (live && (nearBottom || m.sender === state.user)) scrollToBottom();
}

function messageNode(m, prev) {
  const grouped = prev && prev.sender === m.sender && m.ts - prev.ts < 5 * 60 * 1000;
  const mine = m.sender === state.user;
  const li = el("li", {
    class: `message${mine ? " mine" : ""}${grouped ? " grouped" : ""}`,
    dataset: { id: m.id, sender: m.sender, state: "acked", testid: "message" },
  });
  if (m.client_id) li.dataset.clientId = m.client_id;
  li.append(grouped ? el("span", { class: "avatar-space" }) : avatar(m.sender));
  const body = el("div", { class: "body" });
  if (!grouped) {
    body.append(
      el(
        "div",
        { class: "meta" },
        el("span", { class: "sender", text: m.sender }),
        el("time", { datetime: new Date(m.ts).toISOString(), title: dateFmt.format(m.ts), text: timeFmt.format(m.ts) }),
      ),
    );
  }
  const line = el("div", { class: "line" }, el("div", { class: "content", text: m.content, dataset: { testid: "content" } }));
  if (mine) line.append(el("span", { class: "state", title: "sent", text: "✓", dataset: { testid: "state" } }));
  body.append(line);
  li.append(body);
  return li;
}

const PENDING_LABEL = { sending: "sending…", waiting: "waiting for connection…", acked: "✓", failed: "failed — click to retry" };

function pendingNode(client_id, p) {
  const li = el("li", {
    class: "message mine pending",
    dataset: { clientId: client_id, sender: state.user, state: p.status, testid: "message" },
  });
  if (p.id) li.dataset.id = p.id;
  li.append(avatar(state.user));
  const body = el(
    "div",
    { class: "body" },
    el(
      "div",
      { class: "meta" },
      el("span", { class: "sender", text: state.user }),
      el("time", { text: timeFmt.format(p.ts) }),
    ),
  );
  const line = el("div", { class: "line" }, el("div", { class: "content", text: p.frame.content, dataset: { testid: "content" } }));
  body.append(line);
  if (p.status === "failed" && p.error) body.append(el("div", { class: "send-error", text: p.error }));
  li.append(body);
  const stateEl = el("span", { class: "state", text: PENDING_LABEL[p.status] || p.status, dataset: { testid: "state" } });
  if (p.status === "failed") {
    stateEl.classList.add("retry");
    stateEl.setAttribute("role", "button");
    stateEl.tabIndex = 0;
    stateEl.addEventListener("click", () => {
      p.status = "sending";
      p.attempts = 0;
      p.error = null;
      updatePendingNode(client_id);
      resend(client_id);
    });
  }
  line.append(stateEl);
  return li;
}

function appendPendingNode(client_id) {
  const p = state.pending.get(client_id);
  if (p.key !== state.current) return;
  $("message-list").append(pendingNode(client_id, p));
  scrollToBottom();
}

function updatePendingNode(client_id) {
  const p = state.pending.get(client_id);
  const old = document.querySelector(`li[data-client-id="${CSS.escape(client_id)}"].pending`);
  if (!p || !old) return;
  old.replaceWith(pendingNode(client_id, p));
}

function renderTyping(t) {
  const users = [...t.typing.keys()].sort();
  const box = $("typing");
  if (!users.length) box.textContent = "";
  else if (users.length === 1) box.textContent = `${users[0]} is typing…`;
  else if (users.length <= 3) box.textContent = `${users.join(", ")} are typing…`;
  else box.textContent = "Several people are typing…";
}

function updateHistoryStatus(t) {
  const s = $("history-status");
  if (t.key !== state.current) return;
  let text = "";
  let kind = "idle";
  if (t.historyFailed && !t.loadingOlder) {
    s.replaceChildren(
      el("span", { text: "History is unavailable right now. " }),
      el("button", { type: "button", id: "history-retry", class: "link-button", text: "Try again", onclick: retryHistory }),
    );
    s.dataset.state = "error";
    return;
  } else if (t.loadingOlder) {
    text = "Loading messages…";
    kind = "loading";
  } else if (t.historyRequested && !t.hasMore) {
    text = t.order.length ? "This is the beginning of the conversation." : "No messages yet. Say hello!";
    kind = "start";
  } else if (t.historyRequested) {
    s.replaceChildren(el("button", { type: "button", id: "load-older", class: "link-button", text: "Load older messages", onclick: loadOlder }));
    s.dataset.state = "more";
    return;
  }
  s.textContent = text;
  s.dataset.state = kind;
}

function scrollToBottom() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

// ---------------------------------------------------------------------------------------
// Wiring

function onComposerKey(ev) {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer-form").requestSubmit();
    return;
  }
  const now = Date.now();
  if (state.current && now - state.lastTypingSent > TYPING_SEND_EVERY_MS && ev.key.length === 1) {
    const t = thread(state.current);
    if (send(t.kind === "room" ? { type: "typing", room: t.name } : { type: "typing", to: t.name })) {
      state.lastTypingSent = now;
    }
  }
}

function autosize() {
  const c = $("composer");
  c.style.height = "auto";
  c.style.height = `${Math.min(c.scrollHeight, 160)}px`;
}

function init() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut(""));
  $("composer-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const c = $("composer");
    if (sendMessage(c.value)) {
      c.value = "";
      autosize();
    }
    c.focus();
  });
  $("composer").addEventListener("keydown", onComposerKey);
  $("composer").addEventListener("input", autosize);
  $("join-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    joinRoom($("join-room").value);
    $("join-room").value = "";
  });
  $("leave").addEventListener("click", () => {
    const t = state.current && thread(state.current);
    if (t && t.kind === "room") leaveRoom(t.name);
  });
  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 60) loadOlder();
  });
  // Coming back online: do not wait for the backoff timer.
  window.addEventListener("online", () => {
    if (state.token && !state.ws) connect();
  });

  loadConfig().then(() => {
    const token = store.token;
    if (token) startSession(token, store.user || tokenSubject(token));
    else $(state.authMode === "jwt" ? "token" : "name").focus();
  });
}

init();
