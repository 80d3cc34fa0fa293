"""Each replica's in-memory copy of the presence bucket, fed by a KV watch.

It answers 'who is online' and tells the heartbeat handler and the sweeper where to look
(the per-gateway index means a sweep never scans every user). It is only ever a hint for
writes: every change is decided again on the stored value under compare-and-set.
"""

from __future__ import annotations

import bisect
import logging

from presence.state import GATEWAY_PREFIX, USER_PREFIX, GatewayState, UserState

log = logging.getLogger(__name__)


class Mirror:
    def __init__(self) -> None:
        self.users: dict[str, tuple[UserState, int]] = {}
        self.gateways: dict[str, tuple[GatewayState, int]] = {}
        # gateway_id -> connection_id -> user
        self.by_gateway: dict[str, dict[str, str]] = {}
        self.with_pending: set[str] = set()
        self.loaded = False
        self.connections = 0
        self._online: set[str] = set()
        self._sorted: list[str] | None = []

    # --- Feeding ---------------------------------------------------------------------
    def apply(self, key: str, value: bytes | None, revision: int, deleted: bool = False) -> None:
        """Apply one KV entry (from the watch, or from our own successful write). Older
        revisions than what we hold are ignored, so the two feeds can interleave."""
        if key.startswith(USER_PREFIX):
            user = key[len(USER_PREFIX) :]
            held = self.users.get(user)
            if held is not None and held[1] >= revision:
                return
            try:
                state = None if deleted else UserState.decode(value)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("undecodable presence value for %s: %s", key, exc)
                return
            self._set_user(user, state, revision)
        elif key.startswith(GATEWAY_PREFIX):
            gateway = key[len(GATEWAY_PREFIX) :]
            held_gw = self.gateways.get(gateway)
            if held_gw is not None and held_gw[1] >= revision:
                return
            if deleted:
                self.gateways.pop(gateway, None)
                return
            try:
                self.gateways[gateway] = (GatewayState.decode(value), revision)
            except (ValueError, TypeError) as exc:
                log.warning("undecodable presence value for %s: %s", key, exc)

    def _set_user(self, user: str, state: UserState | None, revision: int) -> None:
        old = self.users.get(user)
        if old is not None:
            for cid, conn in old[0].conns.items():
                index = self.by_gateway.get(conn.gateway)
                if index is not None:
                    index.pop(cid, None)
                    if not index:
                        del self.by_gateway[conn.gateway]
            self.connections -= len(old[0].conns)
        if state is None:
            # A deleted key: remember its revision only as "nothing here".
            self.users.pop(user, None)
            self.with_pending.discard(user)
            self._set_online(user, False)
            return
        self.users[user] = (state, revision)
        for cid, conn in state.conns.items():
            self.by_gateway.setdefault(conn.gateway, {})[cid] = user
        self.connections += len(state.conns)
        if state.pending:
            self.with_pending.add(user)
        else:
            self.with_pending.discard(user)
        self._set_online(user, state.online)

    def _set_online(self, user: str, online: bool) -> None:
        if online and user not in self._online:
            self._online.add(user)
            self._sorted = None
        elif not online and user in self._online:
            self._online.discard(user)
            self._sorted = None

    # --- Reading ---------------------------------------------------------------------
    @property
    def online_count(self) -> int:
        return len(self._online)

    def user(self, user: str) -> tuple[UserState, int] | None:
        """A private copy of the user's state and its revision, or None when absent."""
        held = self.users.get(user)
        return None if held is None else (held[0].copy(), held[1])

    def has_conn_or_tombstone(self, user: str, connection_id: str) -> bool:
        held = self.users.get(user)
        return held is not None and (
            connection_id in held[0].conns or connection_id in held[0].closed
        )

    def is_pending(self, user: str, event_id: str) -> bool:
        held = self.users.get(user)
        return held is not None and any(e.event_id == event_id for e in held[0].pending)

    def conns_of(self, gateway: str) -> dict[str, str]:
        return dict(self.by_gateway.get(gateway, {}))

    def online_sorted(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self._online)
        return self._sorted

    def page(self, after: str, limit: int) -> tuple[list[str], str, int]:
        """(users after `after`, next_after or "" when no more, total online)."""
        online = self.online_sorted()
        start = bisect.bisect_right(online, after) if after else 0
        users = online[start : start + limit]
        more = start + limit < len(online)
        return users, (users[-1] if more and users else ""), len(online)
