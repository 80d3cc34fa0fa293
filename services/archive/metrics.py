"""Prometheus metrics of the archive (served on /metrics by chatlib.health)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE = Histogram(
    "archive_batch_size",
    "Tasks per fetched batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
COMMIT_SECONDS = Histogram(
    "archive_commit_seconds",
    "Time to write one batch to Postgres (one transaction)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ROWS_WRITTEN = Counter("archive_rows_written_total", "New rows committed (duplicates excluded)")
REDELIVERIES = Counter(
    "archive_redeliveries_total", "Tasks received that had been delivered before"
)
DEAD_LETTERED = Counter(
    "archive_dead_lettered_total", "Tasks parked on the dead-letter subject", ["cause"]
)
DB_ERRORS = Counter(
    "archive_db_unavailable_total", "Batch writes that failed because Postgres was unreachable"
)
CONSUMER_PENDING = Gauge(
    "archive_consumer_pending", "Tasks in the work queue not yet delivered (the archive's lag)"
)
CONSUMER_ACK_PENDING = Gauge(
    "archive_consumer_ack_pending", "Tasks delivered to some replica and not yet acked"
)
DB_UP = Gauge("archive_db_up", "1 when the last Postgres check or write succeeded")
