"""Prometheus metrics of the outbox relay (the default registry, served by the metrics endpoint).

Every relay reports the whole table's backlog, so aggregate the two gauges with ``max``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BACKLOG_ROWS = Gauge("qm_outbox_backlog_rows", "Rows in the outbox table waiting to be published.")
OLDEST_AGE = Gauge(
    "qm_outbox_oldest_unsent_age_seconds", "Age of the oldest row still in the outbox table."
)
SHARDS_OWNED = Gauge("qm_outbox_shards_owned", "Outbox shards the relays of this process own.")
PUBLISH_LATENCY = Histogram(
    "qm_outbox_publish_latency_seconds",
    "From a row's insert (database clock) to the broker's ack of it.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
PUBLISHED = Counter("qm_outbox_published_total", "Rows the broker acknowledged.")
BATCHES = Counter("qm_outbox_batches_total", "Relay rounds that published at least one row.")
ERRORS = Counter(
    "qm_outbox_errors_total",
    "Relay failures by kind: send (a row the broker did not ack), topic (a topic that could"
    " not be resolved), database, kafka (producer could not start).",
    ["kind"],
)
