"""The bookkeeping of pipelined consumption: offsets committed in order however records finish,
and waiting records taken in order without two of one key in two transactions."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from aiokafka import TopicPartition

from workers.consuming import Incoming, OffsetCommits
from workers.group_commit import GroupCommit
from workers.pipeline import KeyedQueue, Positions


def test_a_partition_is_committed_only_up_to_its_first_record_not_finished() -> None:
    positions = Positions()
    for offset in (10, 11, 12, 13):
        positions.take(offset)
    assert positions.to_commit() is None
    positions.finish(12)
    positions.finish(11)
    assert positions.to_commit() is None  # 10 still runs: nothing after it may be committed
    positions.finish(10)
    assert positions.to_commit() == 13  # the next record to read
    positions.committed(13)
    assert positions.to_commit() is None and len(positions) == 1
    positions.finish(13)
    assert positions.to_commit() == 14 and len(positions) == 0


def test_a_finish_twice_or_of_an_unknown_offset_changes_nothing() -> None:
    positions = Positions()
    positions.take(5)
    positions.take(6)
    positions.finish(6)
    positions.finish(6)
    positions.finish(99)
    assert positions.to_commit() is None and len(positions) == 2


def test_the_last_record_taken_can_be_forgotten_and_read_again() -> None:
    positions = Positions()
    positions.take(1)
    positions.take(2)
    positions.forget(2)
    positions.finish(1)
    assert positions.to_commit() == 2  # 2 was not handed over: it is read again
    positions.take(2)
    with pytest.raises(AssertionError):
        positions.take(2)  # offsets only go forward
    with pytest.raises(AssertionError):
        positions.forget(1)  # only the last one taken


def test_in_any_finishing_order_the_committed_offset_never_passes_an_unfinished_record() -> None:
    rng = random.Random(3)
    for _ in range(200):
        offsets = sorted(rng.sample(range(1000), 20))
        positions = Positions()
        for offset in offsets:
            positions.take(offset)
        finished: set[int] = set()
        for offset in rng.sample(offsets, len(offsets)):
            positions.finish(offset)
            finished.add(offset)
            moved = positions.to_commit()
            if moved is not None:
                assert all(o in finished for o in offsets if o < moved)
                positions.committed(moved)
            unfinished = [o for o in offsets if o not in finished]
            assert len(positions) == (
                len(offsets) - offsets.index(unfinished[0]) if unfinished else 0
            )
        assert positions.to_commit() is None  # the last move was committed
        assert len(positions) == 0


def test_takes_keep_order_and_pass_over_busy_keys_and_the_records_behind_them() -> None:
    queue: KeyedQueue[str] = KeyedQueue()
    for item, key in [("a1", "a"), ("b1", "b"), ("a2", "a"), ("c1", "c")]:
        queue.put(item, key)
    first = queue.take(2)
    assert [e.item for e in first] == ["a1", "b1"]
    queue.put("b2", "b")
    queue.put("d1", "d")
    # a and b are busy in the first transaction: a2 and b2 wait, c1 and d1 may go
    second = queue.take(10)
    assert [e.item for e in second] == ["c1", "d1"]
    assert queue.take(10) == []
    for entry in first:
        queue.release(entry)
    assert [e.item for e in queue.take(10)] == ["a2", "b2"]


def test_a_take_that_is_full_holds_back_later_records_of_the_keys_it_left() -> None:
    queue: KeyedQueue[str] = KeyedQueue()
    for item, key in [("a1", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b")]:
        queue.put(item, key)
    assert [e.item for e in queue.take(1)] == ["a1"]
    assert [e.item for e in queue.take(1)] == ["b1"]
    # b2 never goes before b1 ends, even where a take has room for it
    assert [e.item for e in queue.take(5)] == ["c1"]


def test_records_put_back_go_alone_first_in_their_order_and_hold_their_keys_later_records() -> None:
    queue: KeyedQueue[str] = KeyedQueue()
    for item, key in [("a1", "a"), ("b1", "b"), ("a2", "a")]:
        queue.put(item, key)
    shared = queue.take(2)  # a1, b1 in a transaction that fails
    queue.put("a3", "a")
    queue.put("c1", "c")
    queue.put_back(shared)
    alone = queue.take(10)
    assert [(e.item, e.alone) for e in alone] == [("a1", True)]
    second = queue.take(10)
    assert [(e.item, e.alone) for e in second] == [("b1", True)]
    # a2 and a3 wait for a1; c1 may go
    assert [e.item for e in queue.take(10)] == ["c1"]
    queue.release(alone[0])
    assert [e.item for e in queue.take(10)] == ["a2", "a3"]


def test_records_without_a_key_keep_no_order_with_anyone() -> None:
    queue: KeyedQueue[str] = KeyedQueue()
    queue.put("x", None)
    queue.put("a1", "a")
    queue.put("y", None, alone=True)
    assert [e.item for e in queue.take(10)] == ["x", "a1"]
    assert [e.item for e in queue.take(10)] == ["y"]


def test_in_any_interleaving_a_key_is_held_by_one_take_and_its_records_go_in_order() -> None:
    rng = random.Random(11)
    queue: KeyedQueue[tuple[str, int]] = KeyedQueue()
    sent: dict[str, int] = {}
    applied: dict[str, list[int]] = {}
    running: list[list] = []
    for _ in range(2000):
        roll = rng.random()
        if roll < 0.45:
            key = rng.choice("abcdef")
            sent[key] = sent.get(key, 0) + 1
            queue.put((key, sent[key]), key)
        elif roll < 0.75 and len(running) < 3:
            taken = queue.take(rng.randint(1, 4))
            if taken:
                held = {e.key for batch in running for e in batch}
                assert not held & {e.key for e in taken}
                running.append(taken)
        elif running:
            batch = running.pop(rng.randrange(len(running)))
            if rng.random() < 0.2 and not batch[0].alone:
                queue.put_back(batch)  # its transaction failed: each goes alone
                continue
            for entry in batch:
                key, n = entry.item
                applied.setdefault(key, []).append(n)
                queue.release(entry)
    for key, ns in applied.items():
        assert ns == list(range(1, len(ns) + 1)), key


class Assigned:
    """Stands in for a consumer: only its assignment is read."""

    def __init__(self, *partitions: TopicPartition) -> None:
        self.partitions = set(partitions)

    def assignment(self) -> set[TopicPartition]:
        return self.partitions


def record(offset: int, partition: int = 0) -> Incoming:
    return Incoming("requests", partition, offset, 0, b"k", b"v")


async def test_a_consumer_waits_for_room_at_the_bound_and_reads_on_when_a_record_finishes() -> None:
    commits = OffsetCommits(max_in_flight=3)
    consumer: Any = Assigned(TopicPartition("requests", 0))
    tickets = [await commits.take(consumer, record(n)) for n in range(3)]
    fourth = asyncio.create_task(commits.take(consumer, record(3)))
    for _ in range(5):
        await asyncio.sleep(0)  # let it run as far as it can
    assert not fourth.done() and commits.open == 3
    assert tickets[1] is not None
    tickets[1].finish()  # out of order: room, but nothing to commit yet
    assert await asyncio.wait_for(fourth, 5) is not None
    assert (commits.open, commits.in_flight()) == (3, 4)  # 0 holds back 1's commit
    assert tickets[0] is not None
    tickets[0].finish()
    assert (commits.open, commits.in_flight()) == (2, 2)


async def test_a_record_of_a_partition_moved_away_is_not_taken() -> None:
    commits = OffsetCommits(max_in_flight=3)
    consumer: Any = Assigned(TopicPartition("requests", 0))
    assert await commits.take(consumer, record(0, partition=1)) is None
    assert commits.open == 0 and commits.in_flight() == 0


async def test_a_closed_pipeline_takes_no_more_records() -> None:
    commits = OffsetCommits(max_in_flight=3)
    consumer: Any = Assigned(TopicPartition("requests", 0))
    ticket = await commits.take(consumer, record(0))
    commits.close()
    late = asyncio.create_task(commits.take(consumer, record(1)))
    assert ticket is not None
    ticket.finish()
    assert await commits.settle()  # nothing left in flight
    assert not late.done()
    late.cancel()


async def test_group_commit_keeps_each_keys_order_through_failed_shared_transactions() -> None:
    rng = random.Random(5)
    applied: dict[str, list[int]] = {}
    running: list[set[str]] = []
    most_running = 0

    async def run(items: list[tuple[str, int]], *, shared: bool) -> list[str]:
        nonlocal most_running
        keys = {key for key, _ in items}
        assert not any(keys & other for other in running), "a key in two transactions"
        running.append(keys)
        most_running = max(most_running, len(running))
        try:
            for _ in range(rng.randint(0, 5)):
                await asyncio.sleep(0)  # let the other transaction run meanwhile
            if shared and any(n % 7 == 3 for _, n in items):
                raise RuntimeError("a bad request fails the shared transaction")
            for key, n in items:
                applied.setdefault(key, []).append(n)
            return ["replied"] * len(items)
        finally:
            running.remove(keys)

    async def alone(item: tuple[str, int]) -> str:
        [outcome] = await run([item], shared=False)
        return outcome

    group: GroupCommit[tuple[str, int]] = GroupCommit(
        batch_max=4, transactions=2, shared=lambda items: run(items, shared=True), alone=alone
    )
    sent: dict[str, int] = {}
    outcomes = []
    for _ in range(300):
        key = rng.choice("abcdefgh")
        sent[key] = sent.get(key, 0) + 1
        outcomes.append(group.put((key, sent[key]), key))
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    assert await asyncio.wait_for(asyncio.gather(*outcomes), 30) == ["replied"] * 300
    assert applied == {key: list(range(1, n + 1)) for key, n in sent.items()}
    assert most_running == 2


class Committing(Assigned):
    """Stands in for a consumer whose offsets are committed: records what it was asked to."""

    def __init__(self, *partitions: TopicPartition) -> None:
        super().__init__(*partitions)
        self.committed: list[dict[TopicPartition, int]] = []

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.append(dict(offsets))


async def test_a_record_waiting_for_room_across_a_revocation_is_not_taken_into_the_new_assignment() -> (
    None
):
    # records 0 and 1 are in flight past the settle time when the partition is revoked, and the
    # partition comes straight back; record 2, read before the revocation and waiting for room,
    # must not be registered in the new assignment, whose commit would then pass 0 and 1
    tp = TopicPartition("requests", 0)
    commits = OffsetCommits(max_in_flight=2, settle_seconds=0)
    consumer: Any = Committing(tp)
    first, second = [await commits.take(consumer, record(n)) for n in range(2)]
    assert first is not None and second is not None
    stale = asyncio.create_task(commits.take(consumer, record(2)))
    for _ in range(5):
        await asyncio.sleep(0)  # let it run as far as it can: it waits for room
    assert not stale.done()
    await commits.revoked(consumer, {tp})  # 0 and 1 do not settle in time; tp comes back
    first.finish()  # room: the stale record goes on
    ticket = await asyncio.wait_for(stale, 5)
    if ticket is not None:
        ticket.finish()
    await commits.flush()
    assert consumer.committed == []  # 1 is not final: nothing may be committed past it


async def test_a_lone_run_that_raises_goes_again_and_its_keys_later_items_wait_for_it() -> None:
    applied: list[tuple[str, int]] = []
    failures = [RuntimeError("a bug in the dead-lettering")] * 2

    async def alone(item: tuple[str, int]) -> str:
        if item == ("a", 1) and failures:
            raise failures.pop()
        applied.append(item)
        return "dead_lettered"

    async def shared(items: list[tuple[str, int]]) -> list[str]:
        applied.extend(items)
        return ["replied"] * len(items)

    group: GroupCommit[tuple[str, int]] = GroupCommit(
        batch_max=4, transactions=2, shared=shared, alone=alone, retry_max_seconds=0.01
    )
    first = group.put(("a", 1), "a", alone=True)  # e.g. a record that does not parse
    later = [group.put(("a", 2), "a"), group.put(("b", 1), "b")]
    assert await asyncio.wait_for(first, 10) == "dead_lettered"
    assert await asyncio.wait_for(asyncio.gather(*later), 10) == ["replied", "replied"]
    assert applied.index(("a", 1)) < applied.index(("a", 2))
    assert not failures
