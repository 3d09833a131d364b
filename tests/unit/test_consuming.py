"""Records of one fetched batch are taken only while their partition has not been revoked since
the fetch: a batch outliving a rebalance is read again, never registered in the new assignment."""

from __future__ import annotations

from typing import Any

from aiokafka import TopicPartition

from workers.consuming import Incoming, OffsetCommits


class Committing:
    """Stands in for a consumer: its assignment, and what it was asked to commit."""

    def __init__(self, *partitions: TopicPartition) -> None:
        self.partitions = set(partitions)
        self.committed: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.partitions

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.append(dict(offsets))


def record(offset: int) -> Incoming:
    return Incoming("requests", 0, offset, 0, b"k", b"v")


async def test_the_rest_of_a_batch_fetched_before_a_revocation_is_not_taken_after_it() -> None:
    # records 0..3 came in one fetch; 0 and 1 are handed over and still in flight past the
    # settle time when the partition is revoked, and it comes straight back: 2 and 3, taken
    # after that, must not be registered in the new assignment, whose commits would pass 0 and 1
    tp = TopicPartition("requests", 0)
    commits = OffsetCommits(max_in_flight=8, settle_seconds=0)
    consumer: Any = Committing(tp)
    read_at = commits.revocations(tp)
    first, second = [await commits.take(consumer, record(n), read_at) for n in range(2)]
    assert first is not None and second is not None
    await commits.on_partitions_revoked({tp})  # 0 and 1 do not settle in time
    await commits.on_partitions_assigned({tp})  # the same partition comes back
    assert await commits.take(consumer, record(2), read_at) is None
    assert await commits.take(consumer, record(3), read_at) is None
    # a record fetched after the rebalance is taken as usual
    fresh = await commits.take(consumer, record(0), commits.revocations(tp))
    assert fresh is not None
    fresh.finish()
    await commits.flush()
    assert consumer.committed == [{tp: 1}]  # from the new assignment's own records only
