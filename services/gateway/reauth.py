"""Token lifetime on a long-lived socket, and the `auth` frame that extends it.

A socket lives as long as the token of its hello; at the token's `exp` it is closed with
4401 (after an `unauthorized` error frame) unless the client sent a fresh token for the
same user in an `auth` frame first, which the server confirms with an `auth` frame
carrying the new expiry. The page refreshes its OIDC tokens before they expire and sends
them this way, so the socket (and the messages flowing on it) never stops.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from chatlib.auth import Authenticator, AuthError, Identity

from gateway import frames
from gateway.frames import FrameError
from gateway.session import Session


async def identify(auth: Authenticator, token: object) -> Identity:
    """`auth.identify` off the event loop when it may fetch the provider's keys."""
    if auth.settings.auth_mode == "oidc":
        return await asyncio.to_thread(auth.identify, token)
    return auth.identify(token)


async def is_operator(auth: Authenticator, token: object, role: str) -> bool:
    """Does the token carry the operator role (issue 14: may delete anyone's message)?
    Off the event loop when checking may fetch the provider's keys, as `identify`."""
    if auth.settings.auth_mode == "oidc":
        return await asyncio.to_thread(auth.has_role, token, role)
    return auth.has_role(token, role)


# Sessions whose tokens expire in the same second share one timer (a timer per socket
# cost ~0.5 KiB of an idle socket's memory, issue 18). JWT `exp` is in whole seconds, so
# rounding up to the second closes no socket late.
_buckets: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle, set[Session]]] = {}


def schedule_expiry(session: Session, expires_at: float) -> None:
    """Close the socket with 4401 when its token expires (replaces an earlier schedule)."""
    cancel_expiry(session)
    session.expires_at = expires_at
    loop = asyncio.get_running_loop()
    second = math.ceil(expires_at)
    bucket = _buckets.get(second)
    if bucket is None or bucket[0] is not loop:
        members: set[Session] = set()
        delay = max(0.0, second - time.time())
        handle = loop.call_at(loop.time() + delay, _expire_bucket, second, members)
        bucket = _buckets[second] = (loop, handle, members)
    bucket[2].add(session)
    session.expiry = second


def cancel_expiry(session: Session) -> None:
    second, session.expiry = session.expiry, None
    bucket = _buckets.get(second) if second is not None else None
    if bucket is not None and session in bucket[2]:
        bucket[2].discard(session)
        if not bucket[2]:
            bucket[1].cancel()
            del _buckets[second]  # type: ignore[arg-type]


def _expire_bucket(second: int, members: set[Session]) -> None:
    bucket = _buckets.get(second)
    if bucket is not None and bucket[2] is members:
        del _buckets[second]
    for session in list(members):
        session.expiry = None
        _expire(session)


def _expire(session: Session) -> None:
    if session.closing:
        return
    message = "token expired: send an auth frame with a fresh token before it does"
    session.push(frames.error("unauthorized", message, "auth"))
    session.close_soon(frames.CLOSE_UNAUTHORIZED, "token expired")


async def handle_auth(frame: dict[str, Any], session: Session, deps: Any) -> None:
    """{"type":"auth","token":...}: a fresh token for the same user (and, for guests, the
    same name reservation). A bad one is refused with an error and changes nothing: the
    socket goes on until the current token expires."""
    auth: Authenticator = deps.auth
    try:
        identity = await identify(auth, frame.get("token"))
    except AuthError as exc:
        raise FrameError("unauthorized", str(exc), "auth") from exc
    if identity.user != session.user:
        raise FrameError("unauthorized", "the token is for another user", "auth")
    if identity.holder != session.holder:
        raise FrameError("unauthorized", "the token is bound to another name reservation", "auth")
    schedule_expiry(session, identity.expires_at)
    # The role goes with the token: granted or revoked by the fresh one from now on.
    session.operator = await is_operator(auth, frame.get("token"), deps.settings.operator_role)
    session.push(
        frames.dumps(
            {"type": "auth", "user": identity.user, "expires_at": int(identity.expires_at * 1000)}
        )
    )
