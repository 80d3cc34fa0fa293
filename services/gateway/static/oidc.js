// Sign-in with the organisation's OpenID Connect provider: the authorization code flow
// with PKCE (RFC 7636), the standard for browser apps. No client secret exists in a page;
// the code verifier proves that whoever redeems the code is who asked for it.
//
//   beginSignIn()      discovery, then off to the provider's login page
//   completeSignIn()   back from it: exchange the code for tokens (or resume a tab's tokens)
//   keepFresh(fn)      refresh the tokens before the ID token expires; fn(newIdToken)
//   signOutAtProvider() end the provider's session too (end_session_endpoint)
//
// The gateway verifies the ID token (its audience is our client id). Tokens stay in this
// tab only (sessionStorage): a reload keeps the user signed in, another tab signs in anew.

const KEY = "natschat.oidc";
const REFRESH_AT = 0.7; // refresh once 70 % of the ID token's lifetime has passed
const RETRY_MS = 5000;

let config = null; // {issuer, client_id, scopes, username_claim} from /api/config
let discovery = null;
let refreshTimer = null;

export function configure(oidc) {
  config = oidc;
}

function saved() {
  try {
    return JSON.parse(sessionStorage.getItem(KEY) || "{}");
  } catch {
    return {};
  }
}

function save(value) {
  if (value) sessionStorage.setItem(KEY, JSON.stringify(value));
  else sessionStorage.removeItem(KEY);
}

async function discover() {
  if (discovery) return discovery;
  const url = `${config.issuer.replace(/\/$/, "")}/.well-known/openid-configuration`;
  const resp = await fetch(url, { cache: "no-store" });
  if (!resp.ok) throw new Error(`the sign-in provider did not answer (HTTP ${resp.status})`);
  const doc = await resp.json();
  if (doc.issuer !== config.issuer) throw new Error("the sign-in provider is not the configured one");
  discovery = doc;
  return doc;
}

function base64url(bytes) {
  let text = "";
  for (const b of new Uint8Array(bytes)) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString() {
  return base64url(crypto.getRandomValues(new Uint8Array(32)));
}

function redirectUri() {
  return `${location.origin}/`;
}

// The claims of a JWT we received straight from the provider's token endpoint (over
// TLS); only used to show the name and time the refresh. The gateway verifies it.
export function claimsOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part));
  } catch {
    return {};
  }
}

export async function beginSignIn() {
  const doc = await discover();
  const verifier = randomString();
  const state = randomString();
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  save({ pending: { verifier, state } });
  const params = new URLSearchParams({
    client_id: config.client_id,
    response_type: "code",
    redirect_uri: redirectUri(),
    scope: config.scopes || "openid profile",
    code_challenge: challenge,
    code_challenge_method: "S256",
    state,
  });
  location.assign(`${doc.authorization_endpoint}?${params}`);
}

// Signed in already in this tab, or just back from the provider with a code: the ID
// token and the user; null when not signed in. Throws with a message for the page.
export async function completeSignIn() {
  const url = new URL(location.href);
  const code = url.searchParams.get("code");
  const returned = url.searchParams.get("state");
  const error = url.searchParams.get("error");
  if (code || error) history.replaceState(null, "", url.pathname); // codes are single use
  const stored = saved();
  if (error) {
    save(null);
    throw new Error(`The sign-in provider said: ${url.searchParams.get("error_description") || error}`);
  }
  if (code) {
    const pending = stored.pending;
    if (!pending || pending.state !== returned) {
      save(null);
      throw new Error("That sign-in did not start here. Please sign in again.");
    }
    const doc = await discover();
    const tokens = await tokenRequest(doc, {
      grant_type: "authorization_code",
      code,
      redirect_uri: redirectUri(),
      client_id: config.client_id,
      code_verifier: pending.verifier,
    });
    save(tokens);
    return signedIn(tokens);
  }
  return stored.id_token ? signedIn(stored) : null;
}

function signedIn(tokens) {
  const claim = config.username_claim || "preferred_username";
  const user = claimsOf(tokens.id_token)[claim];
  if (typeof user !== "string" || !/^[a-z0-9][a-z0-9_-]{0,31}$/.test(user)) {
    save(null);
    throw new Error(
      user === undefined
        ? `Your account has no “${claim}”, which this chat uses as your name. Ask your administrator.`
        : `Your account name “${user}” cannot be used here: names are 1–32 lowercase letters, digits, “-” or “_”.`,
    );
  }
  return { idToken: tokens.id_token, user };
}

async function tokenRequest(doc, form) {
  const resp = await fetch(doc.token_endpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams(form),
  });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok || !body.id_token) {
    throw new Error(body.error_description || body.error || `token request failed (HTTP ${resp.status})`);
  }
  return { id_token: body.id_token, refresh_token: body.refresh_token || saved().refresh_token || "" };
}

// Refresh before the ID token expires, for as long as the tab is signed in. onToken gets
// each new ID token (the page sends it on the socket in an `auth` frame); onLost when the
// tokens cannot be refreshed any more (the socket is then closed with 4401 at expiry).
export function keepFresh(onToken, onLost) {
  clearTimeout(refreshTimer);
  const tokens = saved();
  if (!tokens.id_token) return;
  const { iat, exp } = claimsOf(tokens.id_token);
  const now = Date.now() / 1000;
  const issued = typeof iat === "number" ? iat : now;
  const at = issued + (exp - issued) * REFRESH_AT;
  refreshTimer = setTimeout(() => refresh(onToken, onLost), Math.max(0, (at - now) * 1000));
}

async function refresh(onToken, onLost) {
  const tokens = saved();
  if (!tokens.refresh_token) return onLost();
  try {
    const doc = await discover();
    const fresh = await tokenRequest(doc, {
      grant_type: "refresh_token",
      refresh_token: tokens.refresh_token,
      client_id: config.client_id,
    });
    save(fresh);
    onToken(fresh.id_token);
    keepFresh(onToken, onLost);
  } catch (err) {
    // The provider is unreachable (try again) or refused (the session ended there).
    if (/invalid_grant|refused|expired/i.test(String(err.message))) return onLost();
    const { exp } = claimsOf(tokens.id_token);
    if (exp && exp * 1000 <= Date.now()) return onLost();
    refreshTimer = setTimeout(() => refresh(onToken, onLost), RETRY_MS);
  }
}

// Forget the tokens, then end the provider's session too where it supports it.
export async function signOutAtProvider() {
  clearTimeout(refreshTimer);
  const tokens = saved();
  save(null);
  let doc = null;
  try {
    doc = await discover();
  } catch {
    return;
  }
  if (!doc.end_session_endpoint) return;
  const params = new URLSearchParams({ client_id: config.client_id, post_logout_redirect_uri: redirectUri() });
  if (tokens.id_token) params.set("id_token_hint", tokens.id_token);
  location.assign(`${doc.end_session_endpoint}?${params}`);
}
