"""The WebSocket handshake's Origin check (tokens are verified by chatlib.auth)."""

from __future__ import annotations


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Browsers always send Origin on a WebSocket handshake; a cross-site page cannot fake it.

    No Origin: a non-browser client (CLI, test, bot), which has to hold a token anyway.
    Empty allow-list (development only; production refuses it): same host as the request.
    """
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if allowed:
        return origin in {o.rstrip("/") for o in allowed}
    netloc = origin.split("://", 1)[-1]
    return bool(host) and netloc == host
