// A real OpenID Connect provider for the tests: panva's oidc-provider (OpenID Certified),
// with its development login form (any login name, any password: the login becomes the
// account id and its preferred_username).
//
//   node provider.mjs '<json config>'
//
// config: {port, admin_port, issuer, client_id, redirect_uris, post_logout_redirect_uris,
//          id_token_ttl}
//
// The admin port (tests only) rotates the signing key: POST /rotate makes a new RSA key,
// publishes it first in the JWKS (new tokens are signed with it) and keeps the old ones
// published (tokens already issued still verify). The provider's state (sessions,
// grants, refresh tokens) lives in one in-process store that every Provider instance
// shares, so signed-in users stay signed in across a rotation.
import { generateKeyPairSync, randomUUID } from "node:crypto";
import http from "node:http";
import Provider from "oidc-provider";

const config = JSON.parse(process.argv[2]);

// The provider's state, shared by every Provider instance this process builds (so a key
// rotation keeps sessions, grants and refresh tokens). In memory: a test provider.
const store = new Map();
const grants = new Map(); // grantId -> keys of what it issued
class SharedMemoryAdapter {
  constructor(model) {
    this.model = model;
  }
  key(id) {
    return `${this.model}:${id}`;
  }
  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    store.set(key, { payload, expires: expiresIn ? Date.now() + expiresIn * 1000 : null });
    if (payload.grantId) {
      if (!grants.has(payload.grantId)) grants.set(payload.grantId, new Set());
      grants.get(payload.grantId).add(key);
    }
    if (payload.uid) store.set(`uid:${payload.uid}`, { payload: id, expires: null });
    if (payload.userCode) store.set(`userCode:${payload.userCode}`, { payload: id, expires: null });
  }
  get(key) {
    const entry = store.get(key);
    if (!entry) return undefined;
    if (entry.expires && entry.expires < Date.now()) {
      store.delete(key);
      return undefined;
    }
    return entry.payload;
  }
  async find(id) {
    return this.get(this.key(id));
  }
  async findByUid(uid) {
    const id = this.get(`uid:${uid}`);
    return id ? this.find(id) : undefined;
  }
  async findByUserCode(userCode) {
    const id = this.get(`userCode:${userCode}`);
    return id ? this.find(id) : undefined;
  }
  async consume(id) {
    const payload = this.get(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }
  async destroy(id) {
    store.delete(this.key(id));
  }
  async revokeByGrantId(grantId) {
    for (const key of grants.get(grantId) || []) store.delete(key);
    grants.delete(grantId);
  }
}
const keys = [];

function newKey() {
  const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
  const jwk = privateKey.export({ format: "jwk" });
  return { ...jwk, kid: randomUUID(), alg: "RS256", use: "sig" };
}

function build() {
  const provider = new Provider(config.issuer, {
    adapter: SharedMemoryAdapter,
    clients: [
      {
        client_id: config.client_id,
        token_endpoint_auth_method: "none", // a browser app: public client, PKCE
        grant_types: ["authorization_code", "refresh_token"],
        response_types: ["code"],
        redirect_uris: config.redirect_uris,
        post_logout_redirect_uris: config.post_logout_redirect_uris,
      },
    ],
    jwks: { keys },
    cookies: { keys: ["test-cookie-key-not-secret"] },
    pkce: { required: () => true },
    scopes: ["openid", "profile", "offline_access"],
    claims: { openid: ["sub"], profile: ["preferred_username", "name"] },
    features: {
      devInteractions: { enabled: true },
      rpInitiatedLogout: { enabled: true },
    },
    ttl: {
      IdToken: config.id_token_ttl,
      AccessToken: config.id_token_ttl,
      RefreshToken: 3600,
      Session: 3600,
      Grant: 3600,
      Interaction: 600,
    },
    // Refresh tokens for the browser app (it asks for offline_access).
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed("refresh_token"),
    rotateRefreshToken: true,
    // preferred_username in the ID token itself (the gateway reads it from there).
    conformIdTokenClaims: false,
    // The test users have agreed to everything already: no consent screen.
    loadExistingGrant: async (ctx) => {
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope("openid profile offline_access");
      await grant.save();
      return grant;
    },
    findAccount: async (ctx, id) => ({
      accountId: id,
      claims: async () => ({ sub: id, preferred_username: id, name: id }),
    }),
  });
  provider.on("server_error", (ctx, err) => console.error("server_error", err));
  provider.on("grant.error", (ctx, err) => console.error("grant.error", err.error_detail || err.message));
  return provider;
}

keys.push(newKey());
let handler = build().callback();

http.createServer((req, res) => handler(req, res)).listen(config.port, "127.0.0.1");

http
  .createServer((req, res) => {
    if (req.method === "POST" && req.url === "/rotate") {
      keys.unshift(newKey());
      handler = build().callback();
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ kids: keys.map((k) => k.kid) }));
      return;
    }
    res.writeHead(404);
    res.end();
  })
  .listen(config.admin_port, "127.0.0.1");

console.log(`oidc provider ${config.issuer} listening`);
