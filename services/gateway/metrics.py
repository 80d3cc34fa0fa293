"""Prometheus metrics of the gateway (served on /metrics)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

CONNECTIONS = Gauge("gateway_connections", "Open, authenticated WebSocket connections")
FRAMES_IN = Counter("gateway_frames_in_total", "Frames received from clients", ["type"])


class PlainCounter(Collector):
    """A counter for the per-frame hot path: a plain int (`.value += n`, no lock; the
    event loop is single-threaded), read when /metrics is scraped."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation, self.value = name, documentation, 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


_frames_in: dict[str, Any] = {}


def frames_in(kind: str) -> Any:
    """FRAMES_IN's child for a frame type (labels() costs a lock and a lookup per call)."""
    child = _frames_in.get(kind)
    if child is None:
        child = _frames_in[kind] = FRAMES_IN.labels(kind)
    return child


FRAMES_OUT = PlainCounter("gateway_frames_out", "Frames written to client sockets")
REGISTRY.register(FRAMES_OUT)
FANOUT_LATENCY = Histogram(
    "gateway_fanout_latency_seconds",
    "From the message's server timestamp to its frame being queued on local sockets",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RATE_LIMITED = Counter("gateway_rate_limited_frames_total", "Frames refused by the rate limit")
GUEST_RATE_LIMITED = Counter(
    "gateway_guest_rate_limited_total", "Guest sign-ins refused with 429 (per-address limit)"
)
SLOW_DISCONNECTS = Counter(
    "gateway_slow_client_disconnects_total", "Sockets closed because their send queue was full"
)
SEND_FAILURES = Counter(
    "gateway_send_failures_total", "Sends that could not be made durable (client got send_failed)"
)
DUPLICATE_SENDS = Counter(
    "gateway_duplicate_sends_total",
    "Retried sends (same client_id, same request) acked with the original message",
)
IDEMPOTENCY_CONFLICTS = Counter(
    "gateway_idempotency_conflicts_total",
    "Sends refused because their client_id was used for a different request",
)
ABUSE_DISCONNECTS = Counter("gateway_abuse_disconnects_total", "Sockets closed with 1008")
ERRORS = Counter("gateway_error_frames_total", "Error frames sent to clients", ["code"])
REPLAYED = Counter("gateway_recovery_replayed_total", "Messages replayed on reconnect recovery")
GAP_REFILLS = Counter(
    "gateway_live_gap_refills_total", "Live gaps (after a NATS reconnect) refilled from the log"
)
# Reconnect storms (gateway/admission.py, gateway/replay_cache.py).
HELLO_REFUSED = Counter("gateway_hello_refused_total", "Handshakes refused with 503: queue full")
HELLO_WAITING = Gauge("gateway_hello_waiting", "Sockets waiting for a turn to be greeted")
REPLAY_READS = Counter("gateway_replay_stream_reads_total", "CHAT stream reads for replays")
