"""The presence state of one user and of one gateway, as stored in the KV bucket.

Pure data and rules, no I/O: every change is a method that edits a `UserState` in place
and says whether anything changed. The store applies them under compare-and-set, so a
rule sees the latest stored state and can be re-run after a conflict.

Values are JSON so that `nats kv get presence user.<name>` is readable by an operator.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

USER_PREFIX = "user."
GATEWAY_PREFIX = "gw."

# A closed connection is remembered this long, so that a late 'opened' or a heartbeat sent
# before the close cannot bring it back (connection ids are never reused). Far above any
# reordering between core NATS subjects, and below the PRESENCE stream's duplicate window.
TOMBSTONE_TTL_MS = 60_000

# Connection and gateway ids end up in KV keys or values: keep them bounded and plain.
_ID = re.compile(r"^[A-Za-z0-9_=-][A-Za-z0-9_=.-]{0,127}$")

EventKind = Literal["online", "offline"]


def is_valid_id(value: str) -> bool:
    return _ID.match(value) is not None and not value.endswith(".")


def user_key(user: str) -> str:
    return f"{USER_PREFIX}{user}"


def gateway_key(gateway_id: str) -> str:
    return f"{GATEWAY_PREFIX}{gateway_id}"


@dataclass
class Conn:
    gateway: str
    # The gateway's clock when the connection was reported (opened, or first listed in a
    # heartbeat). Heartbeats carry the same clock, so "opened before this heartbeat" is a
    # comparison of one gateway's own timestamps.
    ts_ms: int
    # Presence's clock when the connection was recorded: a connection recorded recently
    # proves its gateway was alive then, even before its first heartbeat is stored.
    seen_ms: int


@dataclass
class PendingEvent:
    """An online/offline event decided by a state change but not yet confirmed published.

    It is written in the same compare-and-set as the change (an outbox), so a replica that
    dies before publishing leaves it for another replica; the id makes the retry a
    duplicate in the PRESENCE stream."""

    kind: EventKind
    event_id: str
    ts_ms: int


@dataclass
class UserState:
    conns: dict[str, Conn] = field(default_factory=dict)
    # connection_id -> presence ms when it closed (tombstones).
    closed: dict[str, int] = field(default_factory=dict)
    pending: list[PendingEvent] = field(default_factory=list)

    @property
    def online(self) -> bool:
        return bool(self.conns)

    # --- Rules. Each returns True when it changed the state. -------------------------
    def open(self, connection_id: str, gateway: str, ts_ms: int, now_ms: int) -> bool:
        """A gateway reported the connection opened (or listed it in a heartbeat)."""
        if connection_id in self.closed or connection_id in self.conns:
            return False
        self.conns[connection_id] = Conn(gateway=gateway, ts_ms=ts_ms, seen_ms=now_ms)
        return True

    def close(self, connection_id: str, now_ms: int) -> bool:
        """The connection ended. The tombstone fences off a late open or heartbeat."""
        removed = self.conns.pop(connection_id, None) is not None
        if connection_id in self.closed:
            return removed
        self.closed[connection_id] = now_ms
        return True

    def drop_unlisted(self, connection_id: str, gateway: str, hb_ts_ms: int, now_ms: int) -> bool:
        """The gateway's heartbeat does not list a connection it reported before it: the
        connection is gone (its close was lost). One opened after the heartbeat was taken
        (ts_ms >= hb_ts_ms) is kept: the next heartbeat will list it."""
        conn = self.conns.get(connection_id)
        if conn is None or conn.gateway != gateway or conn.ts_ms >= hb_ts_ms:
            return False
        return self.close(connection_id, now_ms)

    def expire(self, connection_id: str, gateway: str, cutoff_ms: int) -> bool:
        """The gateway went silent: drop the connection unless it was recorded after the
        cutoff. No tombstone: if the gateway was only cut off, its next heartbeat is the
        truth and brings the connection back."""
        conn = self.conns.get(connection_id)
        if conn is None or conn.gateway != gateway or conn.seen_ms >= cutoff_ms:
            return False
        del self.conns[connection_id]
        return True

    def prune(self, now_ms: int) -> bool:
        old = [cid for cid, at in self.closed.items() if now_ms - at > TOMBSTONE_TTL_MS]
        for cid in old:
            del self.closed[cid]
        return bool(old)

    def note_transition(self, was_online: bool, now_ms: int) -> PendingEvent | None:
        """Queue the event for an online/offline transition, if this change made one."""
        if was_online == self.online:
            return None
        event = PendingEvent(
            kind="online" if self.online else "offline",
            event_id=uuid.uuid4().hex,
            ts_ms=now_ms,
        )
        self.pending.append(event)
        return event

    def idle(self, now_ms: int) -> bool:
        """Nothing left worth keeping: the key can be deleted."""
        return (
            not self.conns
            and not self.pending
            and all(now_ms - at > TOMBSTONE_TTL_MS for at in self.closed.values())
        )

    def copy(self) -> UserState:
        return UserState(
            conns={cid: Conn(c.gateway, c.ts_ms, c.seen_ms) for cid, c in self.conns.items()},
            closed=dict(self.closed),
            pending=[PendingEvent(e.kind, e.event_id, e.ts_ms) for e in self.pending],
        )

    # --- Encoding --------------------------------------------------------------------
    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "conns": {
                    cid: {"gw": c.gateway, "ts": c.ts_ms, "seen": c.seen_ms}
                    for cid, c in self.conns.items()
                },
                "closed": self.closed,
                "pending": [
                    {"kind": e.kind, "id": e.event_id, "ts": e.ts_ms} for e in self.pending
                ],
            }
        )

    @classmethod
    def decode(cls, data: bytes | None) -> UserState:
        if not data:
            return cls()
        raw: dict[str, Any] = orjson.loads(data)
        return cls(
            conns={
                cid: Conn(gateway=str(c["gw"]), ts_ms=int(c["ts"]), seen_ms=int(c["seen"]))
                for cid, c in raw.get("conns", {}).items()
            },
            closed={cid: int(at) for cid, at in raw.get("closed", {}).items()},
            pending=[
                PendingEvent(kind=e["kind"], event_id=str(e["id"]), ts_ms=int(e["ts"]))
                for e in raw.get("pending", [])
                if e.get("kind") in ("online", "offline")
            ],
        )


@dataclass
class GatewayState:
    # Presence's clock at the last heartbeat stored, and the gateway's own clock in it.
    seen_ms: int
    hb_ts_ms: int

    def encode(self) -> bytes:
        return orjson.dumps({"seen": self.seen_ms, "hb_ts": self.hb_ts_ms})

    @classmethod
    def decode(cls, data: bytes | None) -> GatewayState:
        raw: dict[str, Any] = orjson.loads(data) if data else {}
        return cls(seen_ms=int(raw.get("seen", 0)), hb_ts_ms=int(raw.get("hb_ts", 0)))
