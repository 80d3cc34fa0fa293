// natschat web page: sign in, then one WebSocket speaking protocol v1 (see the README).
// No framework and no build step. All user-supplied text goes into the DOM through
// textContent only, never innerHTML, so a message can never inject markup.

import { askRetryAfter, reconnectDelay } from "./backoff.js";
import { MemberList } from "./members.js";
import * as actions from "./actions.js";
import * as oidc from "./oidc.js";
import * as userstate from "./userstate.js";

const PROTOCOL_VERSION = 1;
const TYPING_SHOW_MS = 4000; // how long a typing hint stays without a new typing frame
const TYPING_SEND_EVERY_MS = 2000; // throttle our own typing frames
const HISTORY_PAGE = 50;
// Reconnect backoff: static/backoff.js (full jitter, honours Retry-After); the
// "Retry now" button skips the wait.
const WATCH_MAX = 200; // DM peers whose presence we ask for (the gateway's watch_max)
const PING_EVERY_MS = 15000; // application ping while connected
const PONG_TIMEOUT_MS = 5000; // no frame at all within this after a ping: the socket is dead
const ACK_PROBE_MS = 4000; // a send unanswered this long triggers a ping
const CONNECT_TIMEOUT_MS = 10000; // no welcome this long after connecting: try again
const DEFAULT_ROOM = "lobby"; // always joined: it cannot be left (README)
const NAME_RULE = /^[a-z0-9][a-z0-9_-]{0,31}$/;
const COUNTER_FROM = 0.8; // show the size counter from 80 % of the content limit
const LONG_MESSAGE_CHARS = 700;
const LONG_MESSAGE_LINES = 12;
const DAY_MS = 24 * 60 * 60 * 1000;
const AUTH_RETRY_MS = 10000; // a refused `auth` renewal is offered again after this

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------
// State

const state = {
  authMode: "guest",
  lastRefusal: null, // the code of the error before a 4401 close (name_taken, unauthorized)
  limits: null,
  token: null,
  user: null, // the server's word (welcome), not what we typed
  ws: null,
  connected: false,
  everConnected: false,
  reconnectAttempt: 0,
  reconnectTimer: null,
  reconnectAt: 0,
  connectTimer: null,
  pingTimer: null,
  pongTimer: null,
  maxSeq: 0, // highest CHAT sequence seen: sent as resume_seq
  seqKnown: false,
  rooms: new Set(), // rooms we are in
  dmPeers: new Set(),
  online: new Set(),
  threads: new Map(), // key -> Thread
  current: null, // key of the open thread
  pending: new Map(), // client_id -> {frame, key, status, error, ts, id}
  // The outgoing queue: client_ids in the order the user wrote them. One message is in
  // flight at a time, so the server stores them in that order whatever it refuses.
  outbox: [],
  inflight: null,
  inflightTimer: null,
  pausedUntil: 0,
  pumpTimer: null,
  sendTokens: null, // client-side mirror of the server's write budget
  sendTokensAt: 0,
  failures: 0,
  lastTypingSent: 0,
  newBelow: 0, // live messages in the open thread below the visible part
  hiddenUnread: 0, // messages from others since the tab was hidden
  settings: { notify: false, threadNotify: [] },
};

// "In this room" (static/members.js): the open room's members with their presence.
const members = new MemberList({ send, el, avatar, openDm });

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
// Storage: the token lives for the tab (sessionStorage); rooms, DM peers and settings are
// remembered per user across visits (localStorage).

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
  get(kind, user) {
    return localStorage.getItem(`natschat.${kind}.${user || "_"}`);
  },
  set(kind, user, value) {
    localStorage.setItem(`natschat.${kind}.${user || "_"}`, value);
  },
};

function rememberRooms() {
  store.saveList("rooms", state.user, state.rooms);
}

function rememberDms() {
  store.saveList("dms", state.user, state.dmPeers);
}

function loadSettings(user) {
  try {
    const raw = JSON.parse(store.get("settings", user) || "{}");
    state.settings = {
      notify: raw.notify === true,
      threadNotify: Array.isArray(raw.threadNotify) ? raw.threadNotify.filter((k) => typeof k === "string") : [],
    };
  } catch {
    state.settings = { notify: false, threadNotify: [] };
  }
}

function saveSettings() {
  store.set("settings", state.user, JSON.stringify(state.settings));
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
  noticeTimer = setTimeout(clearNotice, 5000);
}

function clearNotice() {
  clearTimeout(noticeTimer);
  $("notice").hidden = true;
}

const STATUS_TEXT = {
  connecting: "connecting…",
  online: "connected",
  reconnecting: "reconnecting…",
  offline: "offline",
  "signed-out": "signed out",
};

function setStatus(kind) {
  const s = $("status");
  s.dataset.state = kind;
  s.textContent = STATUS_TEXT[kind] || kind;
  updateConnBar();
}

// The bar under the header says what the connection means for the user, in words.
let connNote = null; // {text, until} after a resume
let connBarTimer = null;
function updateConnBar() {
  const kind = $("status").dataset.state;
  const bar = $("conn-bar");
  const text = $("conn-text");
  const retry = $("retry-now");
  clearTimeout(connBarTimer);
  const waiting = state.outbox.length;
  const queued = waiting ? ` ${waiting} message${waiting === 1 ? "" : "s"} will be sent when you are back.` : "";
  if (kind === "offline") {
    bar.hidden = false;
    bar.dataset.kind = "offline";
    text.textContent = `You are offline.${queued}`;
    retry.hidden = false;
  } else if (kind === "reconnecting") {
    bar.hidden = false;
    bar.dataset.kind = "reconnecting";
    const secs = Math.max(0, Math.ceil((state.reconnectAt - Date.now()) / 1000));
    text.textContent = `Connection lost. ${secs > 0 && !state.ws ? `Retrying in ${secs} s.` : "Reconnecting…"}${queued}`;
    retry.hidden = false;
    connBarTimer = setTimeout(updateConnBar, 1000);
  } else if (kind === "online" && connNote && connNote.until > Date.now()) {
    bar.hidden = false;
    bar.dataset.kind = "resumed";
    text.textContent = connNote.text;
    retry.hidden = true;
    connBarTimer = setTimeout(updateConnBar, connNote.until - Date.now());
  } else {
    bar.hidden = true;
    retry.hidden = true;
  }
}

function avatarColor(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return `hsl(${h} 60% 36%)`; // dark enough for white initials (AA)
}

function avatar(name) {
  const a = el("span", { class: "avatar", "aria-hidden": "true", text: name.slice(0, 1).toUpperCase() });
  a.style.background = avatarColor(name);
  return a;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: "long", day: "numeric", month: "long", year: "numeric" });

function dayStart(ts) {
  const d = new Date(ts);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

function dayLabel(ts) {
  const today = dayStart(Date.now());
  const day = dayStart(ts);
  if (day === today) return "Today";
  if (day === dayStart(today - DAY_MS / 2)) return "Yesterday";
  return dayFmt.format(ts);
}

// Relative for the last hour ("now", "5 min ago"), then the clock time; the full date is
// in the title (hover) and the datetime attribute.
function timeLabel(ts) {
  const age = Date.now() - ts;
  if (age < 60 * 1000) return "now";
  if (age < 60 * 60 * 1000) return `${Math.floor(age / 60000)} min ago`;
  return timeFmt.format(ts);
}

function timeNode(ts) {
  return el("time", { datetime: new Date(ts).toISOString(), title: fullFmt.format(ts), text: timeLabel(ts), dataset: { ts: String(ts) } });
}

function refreshTimes() {
  for (const t of document.querySelectorAll("#message-list time[data-ts]")) {
    const label = timeLabel(Number(t.dataset.ts));
    if (t.textContent !== label) t.textContent = label;
  }
  // After midnight "Today" becomes "Yesterday".
  for (const d of document.querySelectorAll("#message-list li.day")) {
    const label = dayLabel(Number(d.dataset.day));
    if (d.firstChild.textContent !== label) d.firstChild.textContent = label;
  }
}

// ---------------------------------------------------------------------------------------
// Theme: follows prefers-color-scheme until the user picks one (remembered per user).

const darkQuery = window.matchMedia("(prefers-color-scheme: dark)");

function applyTheme() {
  const chosen = store.get("theme", state.user);
  const theme = chosen === "dark" || chosen === "light" ? chosen : darkQuery.matches ? "dark" : "light";
  document.documentElement.dataset.theme = theme;
  $("theme").setAttribute("aria-pressed", String(theme === "dark"));
}

function toggleTheme() {
  const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  store.set("theme", state.user, next);
  applyTheme();
}

// ---------------------------------------------------------------------------------------
// Sign in

async function loadConfig() {
  try {
    const resp = await fetch("/api/config", { cache: "no-store" });
    if (resp.ok) {
      const cfg = await resp.json();
      state.authMode = ["jwt", "oidc"].includes(cfg.auth_mode) ? cfg.auth_mode : "guest";
      if (state.authMode === "oidc") oidc.configure(cfg.oidc);
      state.limits = cfg.limits || null;
    }
  } catch {
    // Offline or gateway down: guest form stays; signing in will report the problem.
  }
  const jwt = state.authMode === "jwt";
  $("guest-fields").hidden = state.authMode !== "guest";
  $("jwt-fields").hidden = !jwt;
  $("signin-hint").textContent = jwt
    ? "Paste the access token your organisation gave you."
    : state.authMode === "oidc"
      ? "Sign in with your organisation’s account."
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
  if (state.authMode === "oidc") {
    $("signin").disabled = true;
    try {
      await oidc.beginSignIn(); // leaves the page for the provider's login
    } catch (err) {
      $("signin").disabled = false;
      showSigninError(`Cannot reach the sign-in provider: ${err.message}`);
    }
    return;
  }
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
  loadSettings(user);
  applyTheme();
  $("signin-view").hidden = true;
  $("chat-view").hidden = false;
  $("menu").hidden = false;
  $("notify").hidden = false;
  updateNotifyButtons();
  renderSidebar();
  openThread(state.current || roomKey(DEFAULT_ROOM));
  connect();
}

function signOut(reasonText) {
  store.token = null;
  store.user = null;
  state.token = null;
  clearTimeout(state.reconnectTimer);
  stopPinging();
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
  state.outbox = [];
  state.inflight = null;
  state.online.clear();
  state.current = null;
  state.user = null;
  connNote = null;
  $("message-list").replaceChildren();
  for (const id of ["rooms", "dms", "online"]) $(id).replaceChildren();
  members.show(null, null);
  closeDrawer(false);
  $("chat-view").hidden = true;
  $("signin-view").hidden = false;
  $("me-box").hidden = true;
  $("menu").hidden = true;
  $("notify").hidden = true;
  setStatus("signed-out");
  applyTheme();
  showSigninError(reasonText || "");
  $(state.authMode === "jwt" ? "token" : "name").focus();
}

// ---------------------------------------------------------------------------------------
// Connection: connect, hello, liveness (ping/pong, offline events), reconnect, resume.

function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/ws`;
}

function connect() {
  clearTimeout(state.reconnectTimer);
  if (!state.token || state.ws) return;
  if (navigator.onLine === false) {
    setStatus("offline");
    return; // the "online" event (or Retry now) brings us back
  }
  setStatus(state.everConnected ? "reconnecting" : "connecting");
  const ws = new WebSocket(wsUrl());
  let opened = false; // a socket that never opened may have been turned away (busy)
  state.ws = ws;
  clearTimeout(state.connectTimer);
  state.connectTimer = setTimeout(() => {
    if (state.ws === ws && !state.connected) socketDead(); // a handshake into a black hole
  }, CONNECT_TIMEOUT_MS);
  ws.addEventListener("open", () => {
    if (state.ws !== ws) return;
    opened = true;
    const hello = { type: "hello", v: PROTOCOL_VERSION, token: state.token, rooms: userstate.helloRooms([...state.rooms]) };
    // Presence changes in one frame per interval (presence_batch), not one per user.
    hello.presence_batch = true;
    // Our DM peers' presence is pushed too (rooms' members come with the rooms).
    if (state.dmPeers.size) hello.watch = [...state.dmPeers].slice(0, WATCH_MAX);
    // After a first welcome we know where we are in the log (possibly 0 for an empty one).
    if (state.seqKnown) hello.resume_seq = state.maxSeq;
    ws.send(JSON.stringify(hello));
  });
  ws.addEventListener("message", (ev) => {
    if (state.ws !== ws) return;
    heardFromServer();
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
    if (ev.code === 4401) {
      socketGone();
      signOut(
        state.lastRefusal === "name_taken"
          ? "That name is in use by someone else right now. Pick another one."
          : "Your session is no longer valid. Please sign in again.",
      );
      return;
    }
    socketGone();
    scheduleReconnect(!opened);
  });
}

// The socket is gone (closed, or declared dead): forget it and put its work back.
function socketGone() {
  const ws = state.ws;
  state.ws = null;
  state.connected = false;
  stopPinging();
  if (ws) {
    try {
      ws.close(4000, "dead");
    } catch {
      // already closing
    }
  }
  markPendingWaiting();
  forgetInflightHistory();
}

// A socket that stopped answering (network gone, NAT timeout, sleeping laptop) can stay
// "open" for minutes: declare it dead and start over.
function socketDead() {
  if (!state.ws) return;
  socketGone();
  if (navigator.onLine === false) setStatus("offline");
  else scheduleReconnect();
}

async function scheduleReconnect(refused = false) {
  clearTimeout(state.reconnectTimer);
  if (!state.token) return;
  if (navigator.onLine === false) {
    setStatus("offline");
    return;
  }
  const attempt = state.reconnectAttempt;
  state.reconnectAttempt += 1;
  // Turned away before the upgrade? The gateway says how long to stay away.
  const retryAfter = refused ? await askRetryAfter() : 0;
  if (state.ws || !state.token) return; // "Retry now" (or sign-out) meanwhile
  const delay = reconnectDelay(attempt, retryAfter);
  clearTimeout(state.reconnectTimer);
  state.reconnectAt = Date.now() + delay;
  state.reconnectTimer = setTimeout(connect, delay);
  setStatus("reconnecting");
}

function retryNow() {
  if (!state.token) return;
  state.reconnectAttempt = 0;
  socketGone(); // a connection attempt may hang (server gone mid-handshake): start afresh
  connect();
}

function startPinging() {
  stopPinging();
  state.pingTimer = setInterval(ping, PING_EVERY_MS);
}

function stopPinging() {
  clearInterval(state.pingTimer);
  clearTimeout(state.pongTimer);
  state.pongTimer = null;
}

// Any frame from the server proves the socket alive; a ping with no answer proves it dead.
function ping() {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN || state.pongTimer) return;
  state.ws.send(JSON.stringify({ type: "ping" }));
  state.pongTimer = setTimeout(socketDead, PONG_TIMEOUT_MS);
}

function heardFromServer() {
  clearTimeout(state.pongTimer);
  state.pongTimer = null;
}

// The users whose presence we follow besides our rooms' members: our DM peers.
function sendWatch() {
  send({ type: "watch", users: [...state.dmPeers].slice(0, WATCH_MAX) });
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
      state.lastRefusal = null;
      return onWelcome(f);
    case "auth":
      return; // our fresh token was accepted: the socket lives on
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
    case "presence_batch":
      return onPresenceBatch(f);
    case "members":
      return members.onMembers(f);
    case "typing":
      return onTyping(f);
    case "error":
      return onError(f);
    case "pong":
      return;
    case "edit": // message lifecycle (actions.js)
      return actions.onEdit(f);
    case "delete":
      return actions.onDelete(f);
    case "reaction":
      return actions.onReaction(f);
    case "search":
      return actions.onSearch(f);
    case "membership":
      return userstate.onMembership(f);
    case "read":
      return userstate.onRead(f);
    case "rooms":
      return userstate.onRooms(f);
    case "threads":
      return userstate.onThreads(f);
    case "mention":
      return userstate.onMention(f);
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
  replayed = 0;
  userstate.onWelcome(f);
  setStatus("online");
  $("me").textContent = state.user;
  $("me-avatar").replaceWith(Object.assign(avatar(state.user), { id: "me-avatar" }));
  $("me-box").hidden = false;
  startPinging();
  if (state.current && state.current.startsWith("room:") && !state.rooms.has(state.current.slice(5))) {
    state.current = null;
  }
  renderSidebar();
  const open = state.current && state.current.startsWith("room:") ? state.current.slice(5) : null;
  if (!firstTime && state.current) members.show(open, state.user); // fresh after a reconnect
  if (firstTime || !state.current) openThread(state.current || roomKey(DEFAULT_ROOM), false);
  else ensureHistory(thread(state.current));
  resumeOutbox();
}

let replayed = 0; // messages new to us that came in between welcome and resumed

function onResumed(f) {
  const count = typeof f.replayed === "number" ? f.replayed : replayed;
  connNote = {
    text: `Back online: ${count} message${count === 1 ? "" : "s"} recovered.`,
    until: Date.now() + 15000,
  };
  $("conn-bar").dataset.recovered = String(count);
  updateConnBar();
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

let joinWanted = null;

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
  if (state.current === key) openThread(roomKey(DEFAULT_ROOM));
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
    ...actions.lifecycleFields(m),
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
    sendWatch();
  }
  const t = thread(key);
  // Our own message coming back: it is durable, so the "sending" bubble becomes the real one.
  if (m.client_id && m.sender === state.user && state.pending.has(m.client_id)) {
    resolvePending(m.client_id);
  }
  if (!addMessage(t, m)) return; // duplicate (resume replay, history overlap, other session)
  replayed += 1;
  const fromOther = m.sender !== state.user;
  const looking = key === state.current && !document.hidden;
  const fresh = userstate.counts(t, m); // not counted by the welcome yet
  if (live && key !== state.current && fromOther && fresh) t.unread += 1;
  if (looking) userstate.markRead(t);
  if (live && fromOther) {
    clearTyping(t, m.sender);
    if (document.hidden) {
      state.hiddenUnread += 1;
      updateTitle();
    }
    if (!looking) maybeNotify(t, m);
  }
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
  if (!p) {
    advanceOutbox(f.client_id);
    return;
  }
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
  advanceOutbox(f.client_id);
}

function onHistory(f) {
  const key = f.room ? roomKey(f.room) : f.with ? dmKey(f.with) : null;
  if (!key) return;
  // A page around a search result is shown in context (actions.js), never merged into
  // the thread: its list is one unbroken run of messages up to the newest.
  if (f.around) {
    actions.onContext(f);
    return;
  }
  const t = thread(key);
  t.loadingOlder = false;
  t.historyFailed = false;
  t.latestLoaded = true;
  t.historyRequested = true;
  t.hasMore = Boolean(f.has_more);
  const list = Array.isArray(f.messages) ? f.messages : [];
  for (const raw of list) {
    const m = normalizeMessage(raw);
    if (!m) continue;
    if (!m.room && !m.to) {
      if (f.room) m.room = f.room;
      else m.to = m.sender === state.user ? f.with : state.user;
    }
    if (m.client_id && state.pending.has(m.client_id)) resolvePending(m.client_id);
    const known = t.messages.get(m.id);
    // History knows edits, deletes and reactions made while we were away.
    if (known && (m.deleted || (m.edited_at && !known.version) || m.reactions.size)) Object.assign(known, m);
    addMessage(t, m);
  }
  if (key === state.current) {
    const box = $("messages");
    const fromBottom = box.scrollHeight - box.scrollTop;
    const firstLoad = $("message-list").querySelector("li[data-id]") === null;
    renderMessages(t);
    if (firstLoad || !list.length) scrollToBottom();
    else box.scrollTop = box.scrollHeight - fromBottom; // keep the reader's place
    updateHistoryStatus(t);
  }
  actions.continueJump();
}

function onPresence(user, online) {
  applyPresence(user, online);
  renderSidebar();
}

// Several users' changes at once (each user at most once): one sidebar render.
function onPresenceBatch(f) {
  for (const user of Array.isArray(f.offline) ? f.offline : []) applyPresence(user, false);
  for (const user of Array.isArray(f.online) ? f.online : []) applyPresence(user, true);
  renderSidebar();
}

function applyPresence(user, online) {
  if (typeof user !== "string") return;
  if (online) state.online.add(user);
  else if (user !== state.user || !state.connected) state.online.delete(user);
  members.onPresence(user, online);
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
  if (actions.onActionError(f)) return;
  const p = f.ref ? state.pending.get(f.ref) : null;
  if (p) {
    if (RETRYABLE.has(f.code)) {
      // Not stored: pause the whole queue and send this one again first, with the same
      // client_id (the server dedupes if it got through after all).
      state.failures += 1;
      const rate = state.limits?.rate_per_second || 5;
      const wait = f.code === "rate_limited" ? Math.max(1000 / rate, 250) * 2 : Math.min(500 * 2 ** state.failures, 8000);
      pauseOutbox(f.ref, wait);
    } else {
      p.status = "failed";
      p.error = f.message || f.code;
      updatePendingNode(f.ref);
      dropFromOutbox(f.ref);
    }
    return;
  }
  if (f.ref === "auth") {
    // A fresh token refused (e.g. signed with a key the gateway has not fetched yet):
    // offer it again shortly; the socket stays up until the current token expires.
    setTimeout(() => {
      if (state.ws && state.ws.readyState === WebSocket.OPEN && state.token) {
        state.ws.send(JSON.stringify({ type: "auth", token: state.token }));
      }
    }, AUTH_RETRY_MS);
    return;
  }
  if (f.code === "unauthorized" || f.code === "name_taken") {
    state.lastRefusal = f.code; // the 4401 close that follows signs us out, saying why
    return;
  }
  if (f.ref === "typing") return; // a typing hint that did not go out: nobody needs to know
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
// Sending: one ordered queue. A message is "sending" until its ack (durable), "waiting"
// while there is no connection; the queue pauses on rate_limited/send_failed/disconnect
// and resumes in order; a refused message shows the reason and a Retry button.

function contentBytes(text) {
  return new TextEncoder().encode(text).length;
}

function sendMessage(text) {
  const key = state.current;
  if (!key || !text.trim()) return false;
  const limit = state.limits?.max_content_bytes;
  if (limit && contentBytes(text) > limit) {
    updateCounter();
    return false; // the counter says why; the text stays in the composer
  }
  const t = thread(key);
  const client_id = crypto.randomUUID();
  const frame =
    t.kind === "room"
      ? { type: "send", room: t.name, content: text, client_id }
      : { type: "dm", to: t.name, content: text, client_id };
  const replyTo = actions.takeReplyTo(key);
  if (replyTo) frame.reply_to = replyTo;
  state.pending.set(client_id, { frame, key, status: state.connected ? "sending" : "waiting", ts: Date.now(), id: null });
  state.outbox.push(client_id);
  appendPendingNode(client_id);
  pump();
  updateConnBar();
  return true;
}

function takeSendToken() {
  const rate = state.limits?.rate_per_second;
  const burst = state.limits?.rate_burst;
  if (!rate || !burst) return 0;
  const now = Date.now();
  if (state.sendTokens === null) {
    state.sendTokens = burst;
    state.sendTokensAt = now;
  }
  state.sendTokens = Math.min(burst, state.sendTokens + ((now - state.sendTokensAt) / 1000) * rate);
  state.sendTokensAt = now;
  // Keep a little headroom for typing frames, which share the server's budget.
  if (state.sendTokens >= 2) {
    state.sendTokens -= 1;
    return 0;
  }
  return ((2 - state.sendTokens) / rate) * 1000;
}

function pump() {
  clearTimeout(state.pumpTimer);
  if (state.inflight || !state.connected) return;
  const head = state.outbox[0];
  if (!head) return;
  const p = state.pending.get(head);
  if (!p) {
    state.outbox.shift();
    pump();
    return;
  }
  const wait = state.pausedUntil > Date.now() ? state.pausedUntil - Date.now() : takeSendToken();
  if (wait > 0) {
    state.pumpTimer = setTimeout(pump, wait);
    return;
  }
  if (!send(p.frame)) return;
  state.inflight = head;
  p.status = p.status === "acked" ? p.status : "sending";
  updatePendingNode(head);
  clearTimeout(state.inflightTimer);
  state.inflightTimer = setTimeout(ping, ACK_PROBE_MS); // no answer: is the socket alive?
}

function advanceOutbox(client_id) {
  if (state.inflight === client_id) {
    state.inflight = null;
    clearTimeout(state.inflightTimer);
    state.failures = 0;
  }
  const i = state.outbox.indexOf(client_id);
  if (i >= 0) state.outbox.splice(i, 1);
  pump();
}

function dropFromOutbox(client_id) {
  advanceOutbox(client_id);
}

function pauseOutbox(client_id, wait) {
  if (state.inflight === client_id) {
    state.inflight = null;
    clearTimeout(state.inflightTimer);
  }
  state.pausedUntil = Date.now() + wait;
  state.sendTokens = 0;
  pump();
}

function resumeOutbox() {
  state.inflight = null;
  for (const client_id of state.outbox) {
    const p = state.pending.get(client_id);
    if (p && p.status === "waiting") {
      p.status = "sending";
      updatePendingNode(client_id);
    }
  }
  pump();
}

function retryFailed(client_id) {
  const p = state.pending.get(client_id);
  if (!p || p.status !== "failed") return;
  // A refused message was not stored: send it again under a new key, at the queue's end.
  const fresh = crypto.randomUUID();
  state.pending.delete(client_id);
  p.frame = { ...p.frame, client_id: fresh };
  p.status = state.connected ? "sending" : "waiting";
  p.error = null;
  state.pending.set(fresh, p);
  const node = document.querySelector(`li.pending[data-client-id="${CSS.escape(client_id)}"]`);
  if (node) node.remove();
  state.outbox.push(fresh);
  appendPendingNode(fresh);
  pump();
}

function markPendingWaiting() {
  state.inflight = null;
  clearTimeout(state.inflightTimer);
  clearTimeout(state.pumpTimer);
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
  advanceOutbox(client_id);
}

// ---------------------------------------------------------------------------------------
// Threads: open, join, leave, history

function openThread(key, focusComposer = true) {
  const changed = state.current !== key;
  state.current = key;
  const t = thread(key);
  userstate.opened(t);
  t.unread = 0;
  $("thread-title").textContent = t.kind === "room" ? `# ${t.name}` : `@ ${t.name}`;
  $("thread-title").dataset.thread = key;
  if (changed || !members.room) members.show(t.kind === "room" ? t.name : null, state.user);
  $("leave").hidden = t.kind !== "room" || t.name === DEFAULT_ROOM;
  $("composer").placeholder = t.kind === "room" ? `Message #${t.name}` : `Message ${t.name}`;
  if (changed) clearNotice();
  state.newBelow = 0;
  renderMessages(t);
  scrollToBottom();
  renderTyping(t);
  renderSidebar();
  updateThreadNotify();
  ensureHistory(t);
  updateHistoryStatus(t);
  updateCounter();
  closeDrawer(false);
  if (focusComposer) $("composer").focus();
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
  if (room === DEFAULT_ROOM) return;
  if (!send({ type: "leave", room })) notice("Not connected; try again when reconnected.");
}

function openDm(peer) {
  if (!peer || peer === state.user) return;
  if (!state.dmPeers.has(peer)) {
    state.dmPeers.add(peer);
    rememberDms();
    sendWatch();
  }
  openThread(dmKey(peer));
}

// Alt+Up / Alt+Down: the previous / next thread in the sidebar's order.
function threadKeys() {
  return [...[...state.rooms].sort().map(roomKey), ...[...state.dmPeers].sort().map(dmKey)];
}

function stepThread(delta) {
  const keys = threadKeys();
  if (!keys.length) return;
  const i = keys.indexOf(state.current);
  const next = keys[(i + delta + keys.length) % keys.length];
  openThread(next);
}

// ---------------------------------------------------------------------------------------
// Rendering. The sidebar is updated in place (never rebuilt), so focus and hover survive
// incoming messages and presence changes.

function syncList(ul, items, create, update) {
  const wanted = new Set(items.map((it) => it.key));
  for (const li of [...ul.children]) if (!wanted.has(li.dataset.key)) li.remove();
  const existing = new Map([...ul.children].map((li) => [li.dataset.key, li]));
  let cursor = ul.firstElementChild;
  for (const item of items) {
    let li = existing.get(item.key);
    if (!li) {
      li = create(item);
      li.dataset.key = item.key;
      ul.insertBefore(li, cursor);
    } else if (li !== cursor) {
      ul.insertBefore(li, cursor); // only when the order changed
    } else {
      cursor = cursor.nextElementSibling;
    }
    update(li, item);
  }
}

function renderSidebar() {
  syncList(
    $("rooms"),
    [...state.rooms].sort().map((room) => ({ key: roomKey(room), name: room, kind: "room" })),
    createThreadItem,
    updateThreadItem,
  );
  syncList(
    $("dms"),
    [...state.dmPeers].sort().map((peer) => ({ key: dmKey(peer), name: peer, kind: "dm" })),
    createThreadItem,
    updateThreadItem,
  );
  $("dms-empty").hidden = state.dmPeers.size > 0;
  const users = [...state.online].sort();
  syncList($("online"), users.map((user) => ({ key: `user:${user}`, name: user })), createUserItem, updateUserItem);
  setText($("online-count"), String(users.length));
  updateTitle();
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function createThreadItem(item) {
  const { key, name, kind } = item;
  const label = kind === "room" ? `# ${name}` : name;
  const button = el(
    "button",
    { type: "button", class: "thread-button", onclick: () => openThread(key) },
    kind === "dm" ? el("span", { class: "dot" }) : null,
    el("span", { class: "thread-name", text: label }),
    el("span", { class: "sr-only extra" }), // ", online, 2 unread" for screen readers
  );
  const li = el("li", { dataset: { testid: `${kind}-${name}` } }, button);
  if (kind === "room") {
    li.dataset.room = name;
    if (name !== DEFAULT_ROOM) {
      li.append(
        el("button", {
          type: "button",
          class: "leave-x",
          title: `Leave #${name}`,
          "aria-label": `Leave room ${name}`,
          text: "×",
          dataset: { testid: `leave-${name}` },
          onclick: () => leaveRoom(name),
        }),
      );
    }
  } else {
    li.dataset.peer = name;
  }
  return li;
}

function updateThreadItem(li, item) {
  const { key, name, kind } = item;
  const t = state.threads.get(key);
  const unread = t && key !== state.current ? t.unread : 0;
  const active = key === state.current;
  li.classList.toggle("active", active);
  const button = li.querySelector(".thread-button");
  if (active) button.setAttribute("aria-current", "page");
  else button.removeAttribute("aria-current");
  let badge = li.querySelector(".badge");
  if (unread && !badge) {
    badge = el("span", { class: "badge", "aria-hidden": "true", dataset: { testid: "unread" } });
    button.append(badge);
  } else if (!unread && badge) {
    badge.remove();
  }
  if (unread) setText(badge, unread > 99 ? "99+" : String(unread));
  let extra = "";
  if (kind === "dm") {
    const on = state.online.has(name);
    const dot = li.querySelector(".dot");
    dot.classList.toggle("on", on);
    dot.classList.toggle("off", !on);
    extra += on ? ", online" : ", offline";
  }
  if (unread) extra += `, ${unread} unread`;
  if (t && !active && t.mentions) extra += `, ${t.mentions} mention${t.mentions === 1 ? "" : "s"}`;
  setText(li.querySelector(".extra"), extra);
  userstate.decorate(li, t, active);
}

function createUserItem(item) {
  const user = item.name;
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
}

function updateUserItem() {}

function renderMessages(t) {
  const list = $("message-list");
  const box = $("messages");
  box.setAttribute("aria-busy", "true"); // a whole page is not read out as new messages
  const nodes = [];
  let prev = null;
  for (const id of t.order) {
    const m = t.messages.get(id);
    if (!prev || dayStart(prev.ts) !== dayStart(m.ts)) nodes.push(dayNode(m.ts));
    nodes.push(messageNode(m, prev));
    prev = m;
  }
  for (const [client_id, p] of state.pending) {
    if (p.key === t.key) nodes.push(pendingNode(client_id, p));
  }
  list.replaceChildren(...nodes);
  userstate.placeDivider(t);
  requestAnimationFrame(() => box.removeAttribute("aria-busy"));
}

function dayNode(ts) {
  return el("li", { class: "day", dataset: { day: String(dayStart(ts)), testid: "day" } }, el("span", { text: dayLabel(ts) }));
}

function nearBottom() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function insertMessageNode(t, m, live) {
  const wasNearBottom = nearBottom();
  const idx = t.order.indexOf(m.id);
  const list = $("message-list");
  if (idx !== t.order.length - 1) {
    // Not the newest (history overlap, resume replay out of order): redraw, keep the place.
    const box = $("messages");
    const fromBottom = box.scrollHeight - box.scrollTop;
    renderMessages(t);
    box.scrollTop = box.scrollHeight - fromBottom;
  } else {
    const prev = idx > 0 ? t.messages.get(t.order[idx - 1]) : null;
    const firstPending = list.querySelector("li.pending");
    if (!prev || dayStart(prev.ts) !== dayStart(m.ts)) list.insertBefore(dayNode(m.ts), firstPending);
    list.insertBefore(messageNode(m, prev), firstPending);
  }
  updateHistoryStatus(t);
  if (!live) return;
  if (wasNearBottom || m.sender === state.user) scrollToBottom();
  else {
    state.newBelow += 1;
    updateJump();
  }
}

function messageNode(m, prev) {
  const grouped =
    prev && prev.sender === m.sender && m.ts - prev.ts < 5 * 60 * 1000 && dayStart(prev.ts) === dayStart(m.ts);
  const mine = m.sender === state.user;
  const li = el("li", {
    class: `message${mine ? " mine" : ""}${grouped ? " grouped" : ""}`,
    dataset: { id: m.id, sender: m.sender, state: "acked", testid: "message" },
  });
  if (m.client_id) li.dataset.clientId = m.client_id;
  li.append(grouped ? el("span", { class: "avatar-space" }) : avatar(m.sender));
  const body = el("div", { class: "body" });
  if (!grouped) {
    body.append(el("div", { class: "meta" }, el("span", { class: "sender", text: m.sender }), timeNode(m.ts)));
  } else {
    body.append(el("span", { class: "sr-only", text: `${m.sender}: ` }));
  }
  const line = el("div", { class: "line" }, contentNode(m));
  if (mine) line.append(el("span", { class: "state", title: "sent", "aria-label": "sent", text: "✓", dataset: { testid: "state" } }));
  body.append(line);
  if (isLong(m.content)) body.append(showMoreButton(line));
  li.append(body);
  actions.decorate(li, m, thread(threadKeyOf(m)));
  return li;
}

function contentNode(message) {
  const m = typeof message === "string" ? { content: message } : message; // a pending one: text
  const text = m.content;
  // Rich text (links, **bold**, _italic_, code) as DOM nodes: richtext.js.
  const node = el("div", { class: "content", dir: "auto", dataset: { testid: "content" } }, ...actions.contentNodes(m));
  if (state.user && mentions(text, state.user)) node.classList.add("mention");
  if (isLong(text)) node.classList.add("clamped");
  return node;
}

function isLong(text) {
  return text.length > LONG_MESSAGE_CHARS || text.split("\n").length > LONG_MESSAGE_LINES;
}

function showMoreButton(line) {
  const button = el("button", { type: "button", class: "link-button show-more", "aria-expanded": "false", text: "Show more", dataset: { testid: "show-more" } });
  button.addEventListener("click", () => {
    const content = line.querySelector(".content");
    const open = content.classList.toggle("clamped") === false;
    button.textContent = open ? "Show less" : "Show more";
    button.setAttribute("aria-expanded", String(open));
  });
  return button;
}

function mentions(text, user) {
  return new RegExp(`(^|[^a-z0-9_-])@${user}(?![a-z0-9_-])`, "i").test(text);
}

const PENDING_LABEL = { sending: "sending…", waiting: "waiting for connection…", acked: "✓", failed: "not sent" };

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
    el("div", { class: "meta" }, el("span", { class: "sender", text: state.user }), timeNode(p.ts)),
  );
  const line = el("div", { class: "line" }, contentNode(p.frame.content));
  body.append(line);
  if (p.status === "failed") {
    body.append(
      el(
        "div",
        { class: "send-error" },
        el("span", { text: p.error ? `${p.error} ` : "" }),
        el("button", {
          type: "button",
          class: "link-button retry",
          text: "Retry",
          "aria-label": "Retry sending this message",
          dataset: { testid: "retry" },
          onclick: () => retryFailed(client_id),
        }),
      ),
    );
  }
  li.append(body);
  line.append(el("span", { class: "state", text: PENDING_LABEL[p.status] || p.status, dataset: { testid: "state" } }));
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
  if (!p || !old || old.dataset.state === p.status) return;
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
  const anything = t.order.length > 0 || [...state.pending.values()].some((p) => p.key === t.key);
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
    text = anything ? "This is the beginning of the conversation." : "No messages yet. Say hello!";
    kind = anything ? "start" : "empty";
  } else if (t.historyRequested) {
    if (s.dataset.state !== "more") {
      s.replaceChildren(el("button", { type: "button", id: "load-older", class: "link-button", text: "Load older messages", onclick: loadOlder }));
      s.dataset.state = "more";
    }
    return;
  }
  if (s.textContent !== text || s.dataset.state !== kind) s.textContent = text;
  s.dataset.state = kind;
}

function scrollToBottom() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
  state.newBelow = 0;
  updateJump();
}

function updateJump() {
  const jump = $("jump");
  const show = !nearBottom();
  jump.hidden = !show;
  if (!show) state.newBelow = 0;
  setText($("jump-text"), state.newBelow ? `${state.newBelow} new message${state.newBelow === 1 ? "" : "s"}` : "Jump to latest");
}

// ---------------------------------------------------------------------------------------
// The size counter: shown near the content limit, instead of a toast after the fact.

function updateCounter() {
  const limit = state.limits?.max_content_bytes;
  const counter = $("counter");
  const text = $("composer").value;
  const used = limit ? contentBytes(text) : 0;
  const over = Boolean(limit) && used > limit;
  if (!limit || used < limit * COUNTER_FROM) {
    counter.textContent = "";
    counter.hidden = true;
  } else {
    counter.hidden = false;
    counter.textContent = over ? `${used - limit} bytes too long` : `${limit - used} bytes left`;
  }
  counter.dataset.over = String(over);
  $("composer").setAttribute("aria-invalid", String(over));
  $("send").disabled = over;
}

// ---------------------------------------------------------------------------------------
// Being told: unread count in the title and favicon while hidden, notifications.

const baseTitle = document.title;
let faviconFor = -1;

function updateTitle() {
  const n = document.hidden ? state.hiddenUnread : 0;
  const title = n ? `(${n > 99 ? "99+" : n}) ${baseTitle}` : baseTitle;
  if (document.title !== title) document.title = title;
  if (faviconFor !== n) {
    faviconFor = n;
    $("favicon").href = n ? badgeIcon(n) : "/static/favicon.svg";
    $("favicon").dataset.unread = String(n);
  }
}

function badgeIcon(n) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 64;
  const g = canvas.getContext("2d");
  if (!g) return "/static/favicon.svg";
  g.fillStyle = "#2f6fde";
  g.beginPath();
  g.roundRect(0, 0, 64, 64, 14);
  g.fill();
  g.fillStyle = "#fff";
  g.font = "bold 40px sans-serif";
  g.textAlign = "center";
  g.textBaseline = "middle";
  g.fillText("#", 22, 34);
  g.fillStyle = "#c62a2f";
  g.beginPath();
  g.arc(44, 20, 20, 0, 2 * Math.PI);
  g.fill();
  g.fillStyle = "#fff";
  g.font = "bold 26px sans-serif";
  g.fillText(n > 9 ? "9+" : String(n), 44, 21);
  return canvas.toDataURL("image/png");
}

function onVisibility() {
  if (!document.hidden) {
    state.hiddenUnread = 0;
    if (state.current) {
      thread(state.current).unread = 0;
      userstate.markRead(thread(state.current));
      renderSidebar();
    }
    // Coming back to a tab that slept: check the socket now rather than at the next ping.
    if (state.connected) ping();
    else if (state.token && !state.ws) retryNow();
  }
  updateTitle();
}

function notificationsAllowed() {
  return "Notification" in window && Notification.permission === "granted";
}

function maybeNotify(t, m) {
  if (!notificationsAllowed()) return;
  const wantsAll = state.settings.threadNotify.includes(t.key);
  const direct = t.kind === "dm" || mentions(m.content, state.user);
  if (!wantsAll && !(state.settings.notify && direct)) return;
  const title = t.kind === "dm" ? `${m.sender} (direct message)` : `${m.sender} in #${t.name}`;
  try {
    const n = new Notification(title, { body: m.content.slice(0, 200), tag: t.key });
    n.addEventListener("click", () => {
      window.focus();
      openThread(t.key);
      n.close();
    });
  } catch {
    // Some browsers only allow notifications from a service worker: nothing to do.
  }
}

// Asked for on a click (never on load): browsers refuse, and people dislike, the other way.
async function toggleNotify() {
  if (!state.settings.notify) {
    if (!("Notification" in window)) {
      notice("This browser cannot show notifications.", "info");
      return;
    }
    if (Notification.permission !== "granted") {
      const answer = await Notification.requestPermission();
      if (answer !== "granted") {
        notice("Notifications are blocked for this site in the browser settings.", "info");
        return;
      }
    }
    state.settings.notify = true;
  } else {
    state.settings.notify = false;
  }
  saveSettings();
  updateNotifyButtons();
}

async function toggleThreadNotify() {
  const key = state.current;
  if (!key) return;
  const list = state.settings.threadNotify;
  if (list.includes(key)) state.settings.threadNotify = list.filter((k) => k !== key);
  else {
    if ("Notification" in window && Notification.permission !== "granted") {
      if ((await Notification.requestPermission()) !== "granted") return;
    }
    state.settings.threadNotify = [...list, key];
  }
  saveSettings();
  updateThreadNotify();
}

function updateNotifyButtons() {
  const on = state.settings.notify && notificationsAllowed();
  $("notify").setAttribute("aria-pressed", String(on));
  $("notify").title = on ? "Desktop notifications are on (direct messages and mentions)" : "Turn on desktop notifications for direct messages and mentions";
  updateThreadNotify();
}

function updateThreadNotify() {
  const b = $("thread-notify");
  b.hidden = !state.current || !("Notification" in window);
  b.setAttribute("aria-pressed", String(state.settings.threadNotify.includes(state.current)));
}

// ---------------------------------------------------------------------------------------
// The drawer (narrow screens): menu button, Esc or swipe to close, focus kept inside.

const narrowQuery = window.matchMedia("(max-width: 700px)");

function drawerOpen() {
  return document.body.classList.contains("drawer-open");
}

function openDrawer() {
  if (!narrowQuery.matches) return;
  document.body.classList.add("drawer-open");
  $("menu").setAttribute("aria-expanded", "true");
  $("backdrop").hidden = false;
  $("topbar").inert = true;
  $("conversation").inert = true;
  $("conn-bar").inert = true;
  const first = $("sidebar").querySelector("li.active .thread-button") || $("drawer-close");
  first.focus();
}

function closeDrawer(restoreFocus = true) {
  if (!drawerOpen()) return;
  document.body.classList.remove("drawer-open");
  $("menu").setAttribute("aria-expanded", "false");
  $("backdrop").hidden = true;
  $("topbar").inert = false;
  $("conversation").inert = false;
  $("conn-bar").inert = false;
  if (restoreFocus) $("menu").focus();
}

function trapFocus(ev) {
  if (!drawerOpen() || ev.key !== "Tab") return;
  const focusable = [...$("sidebar").querySelectorAll("button:not([disabled]), input, [tabindex='0']")].filter(
    (n) => n.offsetParent !== null,
  );
  if (!focusable.length) return;
  const first = focusable[0];
  const last = focusable[focusable.length - 1];
  if (ev.shiftKey && document.activeElement === first) {
    ev.preventDefault();
    last.focus();
  } else if (!ev.shiftKey && document.activeElement === last) {
    ev.preventDefault();
    first.focus();
  }
}

let touchX = null;

// ---------------------------------------------------------------------------------------
// Wiring

const coarseQuery = window.matchMedia("(pointer: coarse)");

function onComposerKey(ev) {
  // Enter sends, Shift+Enter is a new line; on touch screens Enter is a new line and the
  // Send button sends (there is no Shift on a phone keyboard).
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && !coarseQuery.matches) {
    ev.preventDefault();
    $("composer-form").requestSubmit();
    return;
  }
  const now = Date.now();
  if (state.current && now - state.lastTypingSent > TYPING_SEND_EVERY_MS && ev.key.length === 1) {
    const t = thread(state.current);
    if (send(t.kind === "room" ? { type: "typing", room: t.name } : { type: "typing", to: t.name })) {
      state.lastTypingSent = now;
      if (state.sendTokens !== null) state.sendTokens -= 1;
    }
  }
}

function autosize() {
  const c = $("composer");
  c.style.height = "auto";
  c.style.height = `${Math.min(c.scrollHeight + 2, Math.max(160, window.innerHeight * 0.3))}px`;
}

function onGlobalKey(ev) {
  if (ev.key === "Escape") {
    if (drawerOpen()) {
      ev.preventDefault();
      closeDrawer();
      return;
    }
    if (!$("notice").hidden) clearNotice();
    return;
  }
  if (ev.altKey && (ev.key === "ArrowUp" || ev.key === "ArrowDown") && state.token) {
    ev.preventDefault();
    const wasInComposer = document.activeElement === $("composer");
    stepThread(ev.key === "ArrowUp" ? -1 : 1);
    if (!wasInComposer) {
      const active = document.querySelector("#sidebar li.active .thread-button");
      if (active && !narrowQuery.matches) active.focus();
    }
  }
}

// What actions.js (edit, delete, react, reply, search) may use of the page.
function refreshThread(key) {
  if (key !== state.current) return;
  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop;
  renderMessages(thread(key));
  box.scrollTop = box.scrollHeight - fromBottom;
}

function init() {
  actions.initActions({ state, send, thread, el, notice, openThread, loadOlder, refresh: refreshThread });
  applyTheme();
  darkQuery.addEventListener("change", applyTheme);
  $("theme").addEventListener("click", toggleTheme);
  $("notify").addEventListener("click", toggleNotify);
  $("thread-notify").addEventListener("click", toggleThreadNotify);
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => {
    signOut("");
    if (state.authMode === "oidc") oidc.signOutAtProvider(); // end the provider's session too
  });
  $("composer-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const c = $("composer");
    if (sendMessage(c.value)) {
      c.value = "";
      autosize();
      updateCounter();
    }
    c.focus();
  });
  $("composer").addEventListener("keydown", onComposerKey);
  $("composer").addEventListener("input", () => {
    autosize();
    updateCounter();
  });
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
    updateJump();
  });
  $("jump").addEventListener("click", () => {
    scrollToBottom();
    $("composer").focus();
  });
  $("retry-now").addEventListener("click", retryNow);
  $("menu").addEventListener("click", () => (drawerOpen() ? closeDrawer() : openDrawer()));
  $("drawer-close").addEventListener("click", () => closeDrawer());
  $("backdrop").addEventListener("click", () => closeDrawer());
  $("sidebar").addEventListener("keydown", trapFocus);
  $("sidebar").addEventListener("touchstart", (ev) => (touchX = ev.touches[0].clientX), { passive: true });
  $("sidebar").addEventListener("touchend", (ev) => {
    if (touchX !== null && ev.changedTouches[0].clientX - touchX < -60) closeDrawer();
    touchX = null;
  });
  narrowQuery.addEventListener("change", () => closeDrawer(false));
  document.addEventListener("keydown", onGlobalKey);
  document.addEventListener("visibilitychange", onVisibility);
  // The browser knows about the network before the socket does.
  window.addEventListener("offline", () => {
    if (!state.token) return;
    socketGone();
    clearTimeout(state.reconnectTimer);
    setStatus("offline");
  });
  window.addEventListener("online", () => {
    if (state.token && !state.connected) retryNow();
  });
  setInterval(refreshTimes, 30000);

  loadConfig().then(async () => {
    if (state.authMode === "oidc") return resumeOidc();
    const token = store.token;
    if (token) startSession(token, store.user || tokenSubject(token));
    else $(state.authMode === "jwt" ? "token" : "name").focus();
  });
}

// OIDC: back from the provider (or reloaded while signed in): start the session, then
// keep its token fresh. Each new ID token is sent on the open socket (an `auth` frame):
// no reconnect, no lost message; a reconnect later says hello with the newest token.
async function resumeOidc() {
  let signedIn = null;
  try {
    signedIn = await oidc.completeSignIn();
  } catch (err) {
    showSigninError(err.message);
  }
  if (!signedIn) return $("signin").focus();
  store.token = signedIn.idToken;
  store.user = signedIn.user;
  startSession(signedIn.idToken, signedIn.user);
  oidc.keepFresh(
    (idToken) => {
      state.token = idToken;
      store.token = idToken;
      if (state.ws && state.ws.readyState === WebSocket.OPEN) {
        state.ws.send(JSON.stringify({ type: "auth", token: idToken }));
      }
    },
    () => {}, // cannot refresh: the socket closes with 4401 at expiry and we sign out
  );
}

userstate.install({
  state,
  thread,
  send,
  renderSidebar,
  openThread,
  joinRoom,
  rememberRooms,
  rememberDms,
  el,
  roomKey,
  dmKey,
});
init();
