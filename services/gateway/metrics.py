"""Prometheus metrics of the gateway (served on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("gateway_connections", "Open, authenticated WebSocket connections")
FRAMES_IN = Counter("gateway_frames_in_total", "Frames received from clients", ["type"])
FRAMES_OUT = Counter("gateway_frames_out_total", "Frames written to client sockets")
FANOUT_LATENCY = Histogram(
    "gateway_fanout_latency_seconds",
    "From the message's server timestamp to its frame being queued on local sockets",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RATE_LIMITED = Counter("gateway_rate_limited_frames_total", "Frames refused by the rate limit")
SLOW_DISCONNECTS = Counter(
    "gateway_slow_client_disconnects_total", "Sockets closed because their send queue was full"
)
SEND_FAILURES = Counter(
    "gateway_send_failures_total", "Sends that could not be made durable (client got send_failed)"
)
ABUSE_DISCONNECTS = Counter("gateway_abuse_disconnects_total", "Sockets closed with 1008")
ERRORS = Counter("gateway_error_frames_total", "Error frames sent to clients", ["code"])
REPLAYED = Counter("gateway_recovery_replayed_total", "Messages replayed on reconnect recovery")
GAP_REFILLS = Counter(
    "gateway_live_gap_refills_total", "Live gaps (after a NATS reconnect) refilled from the log"
)
