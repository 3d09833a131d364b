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
    read_at = commits.revocations(consumer, tp)
    first, second = [await commits.take(consumer, record(n), read_at) for n in range(2)]
    assert first is not None and second is not None
    await commits.revoked(consumer, {tp})  # 0 and 1 do not settle in time
    assert await commits.take(consumer, record(2), read_at) is None
    assert await commits.take(consumer, record(3), read_at) is None
    # a record fetched after the rebalance is taken as usual
    fresh = await commits.take(consumer, record(0), commits.revocations(consumer, tp))
    assert fresh is not None
    fresh.finish()
    await commits.flush()
    assert consumer.committed == [{tp: 1}]  # from the new assignment's own records only


async def test_a_partition_another_consumer_of_the_process_gives_up_late_stays_with_its_owner() -> (
    None
):
    # consumer A was thrown out of the group and tp went to B, of the same process; A learns it
    # late and its listener gives up tp: B's records of tp, in flight and still to hand over from
    # its batch, stay B's, and B commits nothing past a record not final
    tp = TopicPartition("requests", 0)
    commits = OffsetCommits(max_in_flight=8, settle_seconds=0)
    a: Any = Committing()
    b: Any = Committing(tp)
    read_at = commits.revocations(b, tp)
    first = await commits.take(b, record(0), read_at)
    assert first is not None

    await commits.listener(a).on_partitions_revoked({tp})

    rest = [await commits.take(b, record(n), read_at) for n in (1, 2)]
    assert all(ticket is not None for ticket in rest)
    for ticket in rest:
        assert ticket is not None
        ticket.finish()
    await commits.flush()
    assert b.committed == []  # 0 is not final: nothing past it
    first.finish()
    await commits.flush()
    assert b.committed == [{tp: 3}]
