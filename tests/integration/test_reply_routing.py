"""Reply routing end to end: SDK clients sharing the reply topic each read one partition of it,
and Quartermaster's real processes (`qm run all`) send each client's replies there; a client that
does not route keeps reading the whole topic and gets its replies where their key sends them."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from app.kafka import client_options, ensure_topics, sdk_client
from app.sdk import QuartermasterClient, QuartermasterError
from app.settings import Settings
from tests.integration.conftest_outbox import read_topic
from tests.support.leasing import make_site, scalar
from tests.support.processes import QmProcess
from tests.support.waiting import eventually


async def reply_partitions(settings: Settings) -> dict[str, set[int]]:
    """The partitions of the reply topic each job's replies landed on."""
    where: dict[str, set[int]] = defaultdict(set)
    for record in await read_topic(settings, settings.topic("replies")):
        assert record.key is not None
        where[record.key.decode()].add(record.partition)
    return where


def assigned(client: QuartermasterClient) -> set[int]:
    assert client._consumer is not None
    return {tp.partition for tp in client._consumer.assignment()}


async def run_job(client: QuartermasterClient, job_id: str) -> None:
    async with client.job(site="board", job_id=job_id, timeout=30):
        pass


async def test_clients_sharing_the_reply_topic_each_get_their_replies_on_their_own_partition(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=8, n_accounts=8)
    with QmProcess(settings, "all"):
        async with (
            sdk_client(settings, reply_partition=1) as one,
            sdk_client(settings, reply_partition=5) as two,
            sdk_client(settings) as picked,
            sdk_client(settings, route_replies=False) as old,
        ):
            await asyncio.gather(
                *(run_job(one, f"one-{n}") for n in range(3)),
                *(run_job(two, f"two-{n}") for n in range(3)),
                run_job(picked, "picked"),
                run_job(old, "old"),
            )
            assert assigned(one) == {1} and assigned(two) == {5}
            assert picked.reply_partition in range(settings.reply_topic_partitions)
            assert assigned(picked) == {picked.reply_partition}
            every = set(range(settings.reply_topic_partitions))
            assert old.reply_partition is None and assigned(old) == every

    where = await reply_partitions(settings)
    for n in range(3):  # job.granted and job.finished of each job, all on its client's partition
        assert where[f"one-{n}"] == {1} and where[f"two-{n}"] == {5}
    assert where["picked"] == {picked.reply_partition}
    ordered = sorted(every)
    assert where["old"] == {DefaultPartitioner()(b"old", ordered, ordered)}  # as before routing


async def test_a_queued_start_granted_later_reaches_the_partition_it_asked_for(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=1, n_accounts=1)
    with QmProcess(settings, "all"):
        async with (
            sdk_client(settings, reply_partition=2) as holder,
            sdk_client(settings, reply_partition=6) as waiter,
        ):
            async with holder.job(site="board", job_id="first", timeout=30):

                async def waits() -> None:
                    async with waiter.job(
                        site="board", job_id="second", wait_seconds=60, timeout=30
                    ) as job:
                        assert job.lease_token is not None

                waiting = asyncio.create_task(waits())

                async def queued() -> bool:
                    status = await scalar(
                        engine, "SELECT status::text FROM jobs WHERE id = 'second'"
                    )
                    return bool(status == "QUEUED")

                await eventually(queued, timeout=30)
            await asyncio.wait_for(waiting, 30)  # granted by the first job's finish

    assert await scalar(engine, "SELECT reply_partition FROM jobs WHERE id = 'second'") == 6
    where = await reply_partitions(settings)
    assert where["first"] == {2}
    assert where["second"] == {6}  # job.queued, then job.granted from the other transaction


async def test_a_reply_partition_the_topic_does_not_have_stops_the_client_from_starting(
    topics: Settings,
) -> None:
    beyond = topics.reply_topic_partitions
    client = sdk_client(topics, reply_partition=beyond)
    with pytest.raises(QuartermasterError, match=f"reply partition {beyond} does not exist"):
        await client.start()
    await client.close()


async def test_an_existing_reply_topic_with_fewer_partitions_is_kept_and_named_in_a_warning(
    settings: Settings,
) -> None:
    replies = settings.topic("replies")  # as an older version made it
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(replies, 2, 1)])

        async def listed() -> bool:  # the broker's metadata shows a new topic within moments
            return replies in await admin.list_topics()

        await eventually(listed, timeout=30)
        with capture_logs() as logs:
            assert replies not in await ensure_topics(settings)
        [described] = await admin.describe_topics([replies])
    finally:
        await admin.close()

    assert len(described["partitions"]) == 2
    [warning] = [e for e in logs if e["event"] == "reply_topic_has_fewer_partitions"]
    assert (warning["topic"], warning["partitions"]) == (replies, 2)
    assert warning["reply_topic_partitions"] == settings.reply_topic_partitions
    async with sdk_client(settings) as client:
        assert client.reply_partition in (0, 1)  # it picks among the partitions there are
