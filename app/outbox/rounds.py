"""The bookkeeping of a relay round: what it did, its rows by outcome, its producer batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from app.store.outbox import UnsentRow


@dataclass(frozen=True, slots=True)
class RelayRound:
    """What one ``run_once`` did."""

    shards: tuple[int, ...]  # shards owned during the round
    published: int = 0  # rows acked by the broker and deleted
    failed: int = 0  # rows whose send failed; they stay for a later round
    waiting: int = 0  # rows read but not sent (topic unavailable, or an earlier row failed)
    full: bool = False  # some shard had a full batch: more rows are likely waiting

    @property
    def idle(self) -> bool:
        return self.published == 0 and self.failed == 0 and not self.full


@dataclass(slots=True)
class Outcome:
    """The rows of one round, sorted by what the broker did with them."""

    acked: list[UnsentRow] = field(default_factory=list)
    failed: list[UnsentRow] = field(default_factory=list)
    waiting: int = 0
    acked_at: float = 0.0


@dataclass(slots=True)
class PartitionBatch:
    """One partition's rows in a producer batch, in id order."""

    builder: BatchBuilder
    rows: list[UnsentRow] = field(default_factory=list)

    def add(self, row: UnsentRow) -> bool:
        """Append ``row``; False when the batch is full."""
        if (
            self.builder.append(timestamp=None, key=row.key, value=row.payload, headers=row.headers)
            is None
        ):
            return False
        self.rows.append(row)
        return True


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff: 0.1 s, 0.2 s, ... up to ``cap``."""

    cap: float
    failures: int = 0

    def next_delay(self) -> float:
        self.failures = min(self.failures + 1, 32)
        return min(self.cap, 0.1 * 2 ** (self.failures - 1))

    def reset(self) -> None:
        self.failures = 0


def any_shard_full(rows: Sequence[UnsentRow], limit: int) -> bool:
    counts: dict[int, int] = {}
    for row in rows:
        counts[row.shard] = counts.get(row.shard, 0) + 1
    return any(count >= limit for count in counts.values())


def message_size(row: UnsentRow) -> int:
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(row.key, row.payload, row.headers)
