"""What the outbox relay reports: Prometheus metrics (default registry) and its publish log lines.

Every relay reports the whole table's backlog, so aggregate the two gauges with ``max``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from prometheus_client import Counter, Gauge, Histogram

from app.store.outbox import UnsentRow

log = structlog.get_logger()

SUMMARY_SECONDS = 1.0  # an outbox_published line at info level at most this often

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
    " not be resolved), database, kafka (producer could not start), partition (a row asked for"
    " a partition its topic does not have, and went to its key's instead).",
    ["kind"],
)

DEAD_LETTERED = Counter(
    "qm_outbox_dead_lettered_total",
    "Rows the broker refused for good, turned into dead letters on the outbox.dlt topic, by error.",
    ["error_class"],
)
PARKED = Counter(
    "qm_outbox_parked_total", "Dead letters the broker refused for good too, parked in the table."
)
PARKED_ROWS = Gauge("qm_outbox_parked_rows", "Rows parked in the outbox table for an operator.")


@dataclass(slots=True)
class _Summary:
    """Counts between two ``outbox_published`` lines."""

    rows: int = 0
    rounds: int = 0
    last_outbox_id: int = 0
    shards: set[int] = field(default_factory=set)
    topics: set[str] = field(default_factory=set)
    since: float = field(default_factory=time.monotonic)


class PublishReport:
    """Metrics and logs of the rows a relay published: ids, topics, shards; never payloads."""

    def __init__(self) -> None:
        self._summary = _Summary()

    def published(self, acked: Sequence[UnsentRow], in_flight_seconds: float) -> None:
        """Record one round's acked rows; ``in_flight_seconds`` ran from their read to the ack."""
        for row in acked:
            # age by the database's clock when read, plus our own clock's time to the ack: no
            # comparison of two machines' clocks
            PUBLISH_LATENCY.observe(row.age_seconds + in_flight_seconds)
        PUBLISHED.inc(len(acked))
        BATCHES.inc()
        by_shard: dict[int, list[UnsentRow]] = {}
        for row in acked:
            by_shard.setdefault(row.shard, []).append(row)
        for shard, rows in by_shard.items():
            log.debug(
                "outbox_batch_published",
                shard=shard,
                rows=len(rows),
                outbox_id=rows[-1].id,
                first_outbox_id=rows[0].id,
                topic=sorted({row.topic for row in rows}),
            )
        summary = self._summary
        summary.rows += len(acked)
        summary.rounds += 1
        summary.last_outbox_id = max(summary.last_outbox_id, max(row.id for row in acked))
        summary.shards.update(by_shard)
        summary.topics.update(row.topic for row in acked)
        self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Log ``outbox_published`` for the rows since the last line, if a second has passed."""
        summary = self._summary
        if summary.rows == 0 or not (force or time.monotonic() - summary.since >= SUMMARY_SECONDS):
            return
        log.info(
            "outbox_published",
            rows=summary.rows,
            rounds=summary.rounds,
            outbox_id=summary.last_outbox_id,
            shard=sorted(summary.shards),
            topic=sorted(summary.topics),
        )
        self._summary = _Summary()
