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


def content_security_policy(oidc_issuer: str = "") -> str:
    """The page's CSP: only our own scripts and styles, sockets to us, fetches to us and
    (OIDC) to the provider's origin (discovery, token and refresh requests)."""
    connect = ["'self'", "ws:", "wss:"]
    if oidc_issuer:
        connect.append(_origin(oidc_issuer))
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {' '.join(connect)}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


def security_headers(csp: str, https: bool, hsts_max_age: int) -> list[tuple[bytes, bytes]]:
    """Headers on every HTTP response. HSTS only over https (behind TLS): sent over plain
    http it would be ignored, and a laptop's http://localhost must keep working."""
    headers = [
        (b"content-security-policy", csp.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"cross-origin-opener-policy", b"same-origin"),
    ]
    if https and hsts_max_age:
        headers.append((b"strict-transport-security", f"max-age={hsts_max_age}".encode()))
    return headers


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
