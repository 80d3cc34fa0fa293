"""Prometheus metrics of the gateway (served on /metrics)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

CONNECTIONS = Gauge("gateway_connections", "Open, authenticated WebSocket connections")


class PlainCounter(Collector):
    """A counter for the per-frame hot path: a plain int (`.value += n`, no lock; the
    event loop is single-threaded), read when /metrics is scraped."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation, self.value = name, documentation, 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


class PlainLabelledCounter(Collector):
    """PlainCounter with one label: a plain int per label value (`.labels(v).value += n`)."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self._children: dict[str, PlainCounter] = {}

    def labels(self, value: str) -> PlainCounter:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = PlainCounter(self.name, self.documentation)
        return child

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, child in list(self._children.items()):
            family.add_metric([value], child.value)
        yield family


class PlainHistogram(Collector):
    """A histogram for the per-message hot path: plain ints and a float, no lock (the
    event loop is single-threaded); the same samples as prometheus_client's Histogram
    (without `_created`)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = [*buckets, math.inf]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # Histogram puts a value in the first bucket whose bound is >= it.
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds, self._counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self._sum
        )


# Frames received from clients, by type: counted for every frame (issue 18: the library
# counter's lock per increment showed in py-spy).
FRAMES_IN = PlainLabelledCounter("gateway_frames_in", "Frames received from clients", "type")
REGISTRY.register(FRAMES_IN)
frames_in = FRAMES_IN.labels
FRAMES_OUT = PlainCounter("gateway_frames_out", "Frames written to client sockets")
REGISTRY.register(FRAMES_OUT)
FANOUT_LATENCY = PlainHistogram(
    "gateway_fanout_latency_seconds",
    "From the message's server timestamp to its frame being queued on local sockets",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
REGISTRY.register(FANOUT_LATENCY)
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
