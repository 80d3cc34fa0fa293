// Reconnect delays: full-jitter exponential backoff that honours a busy gateway's
// Retry-After, plus a random share of one second (the same rule as chatlib/backoff.py;
// the gateway spreads the turns it hands out). A fleet of pages that lost the same
// gateway at the same instant spreads over the whole window instead of coming back in
// waves. A browser cannot read the status of a refused WebSocket handshake, so after a
// socket that never opened we ask /api/admission, which answers 503 + Retry-After while
// the gateway turns new sockets away.

const BASE_MS = 500;
const CAP_MS = 8000; // never more than ~8 s after the server is back ("Retry now" skips it)

export function reconnectDelay(attempt, retryAfterS = 0) {
  let wait = Math.random() * Math.min(CAP_MS, BASE_MS * 2 ** Math.min(attempt, 30));
  if (retryAfterS > 0) wait = Math.max(wait, (retryAfterS + Math.random()) * 1000);
  return wait;
}

// Seconds the gateway asks us to wait (0: not busy, or it could not say).
export async function askRetryAfter() {
  try {
    const resp = await fetch("/api/admission", { cache: "no-store" });
    if (resp.status !== 503) return 0;
    const secs = Number(resp.headers.get("Retry-After"));
    return Number.isFinite(secs) && secs > 0 ? Math.min(secs, 300) : 0;
  } catch {
    return 0; // unreachable: the plain backoff applies
  }
}
