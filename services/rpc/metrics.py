"""Prometheus metrics of the rpc service (served on /metrics by chatlib.health)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CALLS = Counter("rpc_calls_total", "gRPC calls by method and status code", ["method", "code"])
STREAMS = Gauge("rpc_streams", "StreamMessages calls open now")
STREAMED = Counter("rpc_streamed_messages_total", "Messages delivered on StreamMessages")
