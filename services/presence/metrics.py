"""Prometheus metrics of presence (served on /metrics by chatlib.health)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# What this replica's mirror of the bucket shows: the same in every replica, give or take
# a few milliseconds of watch delay.
ONLINE_USERS = Gauge("presence_online_users", "Users with at least one live connection")
CONNECTIONS = Gauge("presence_connections", "Live connections across all gateways")
EVENTS = Counter(
    "presence_events_total",
    "Online/offline events this replica published (retries deduplicated by the stream "
    "are not counted)",
    ["kind"],
)
HEARTBEAT_LAG = Histogram(
    "presence_heartbeat_lag_seconds",
    "Gateway heartbeat age when handled (gateway clock to presence clock)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
CAS_CONFLICTS = Counter(
    "presence_cas_conflicts_total", "Compare-and-set writes retried after another writer won"
)
REJECTED = Counter("presence_rejected_total", "Reports dropped as invalid", ["reason"])
SWEPT = Counter(
    "presence_expired_connections_total", "Connections dropped because their gateway went silent"
)
