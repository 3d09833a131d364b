"""`qm run auditor`: a violating history on the test's qm.events is counted in
``qm_audit_violations_total`` and posted to Slack once per kind (a local server stands in)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from prometheus_client.parser import text_string_to_metric_families

from app.devstack import free_port
from app.kafka import client_options
from app.settings import Settings
from tests.support.http import get
from tests.support.processes import QmProcess
from tests.support.slack import FakeSlack
from tests.support.waiting import eventually


def grant(job: str, token: int, at: datetime) -> dict[str, Any]:
    return {"type": "job.granted", "v": 1, "entity": "job", "id": job, "site": "board",
            "status": "RUNNING", "at": at.isoformat(), "db_at": at.isoformat(),
            "lease_token": token, "account_id": "7", "capacity": 5,
            "lease_expires_at": (at + timedelta(minutes=5)).isoformat()}  # fmt: skip


async def metric(port: int, name: str, **labels: str) -> float | None:
    status, body = await get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return None
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


async def test_audit_the_auditor_counts_an_account_leased_twice_and_posts_it_once(
    topics: Settings,
) -> None:
    settings = topics
    port = free_port()
    with (
        FakeSlack() as slack,
        QmProcess(
            settings,
            "auditor",
            metrics_port=port,
            slack_webhook_url=slack.url,
            audit_reorder_seconds=0.5,
        ) as auditor,  # fmt: skip
    ):

        async def ready() -> bool:
            assert auditor.proc is not None and auditor.proc.poll() is None, auditor.output()
            return (await get(f"http://127.0.0.1:{port}/readyz"))[0] == 200

        await eventually(ready, timeout=60)
        assert await metric(port, "qm_audit_lag_seconds") == 0
        now = datetime.now(UTC)
        history = [grant("j1", 1, now), grant("j2", 2, now + timedelta(milliseconds=5)),
                   grant("j3", 3, now + timedelta(milliseconds=10))]  # fmt: skip
        producer = AIOKafkaProducer(**client_options(settings))
        await producer.start()
        try:
            for event in history:  # keyed by job: three partitions, in any order
                await producer.send_and_wait(
                    settings.topic("events"), json.dumps(event).encode(), key=event["id"].encode()
                )
        finally:
            await producer.stop()

        async def counted() -> bool:
            return await metric(port, "qm_audit_violations_total", kind="overlap") == 2

        await eventually(counted, timeout=30)
        await eventually(lambda: _posted(slack), timeout=30)
    texts = slack.texts()
    assert len(texts) == 1, texts  # two overlaps of one kind: one post
    assert "Audit: VIOLATION overlap account 7" in texts[0]
    assert ".events[" in texts[0]  # the events that prove it, by topic, partition and offset


async def test_audit_the_auditor_follows_a_partition_added_to_the_events_topic_after_its_start(
    topics: Settings,
) -> None:
    settings = topics
    port = free_port()
    events = settings.topic("events")
    with QmProcess(settings, "auditor", metrics_port=port, audit_reorder_seconds=0.5,
                   audit_partitions_seconds=0.5) as auditor:  # fmt: skip

        async def ready() -> bool:
            assert auditor.proc is not None and auditor.proc.poll() is None, auditor.output()
            return (await get(f"http://127.0.0.1:{port}/readyz"))[0] == 200

        await eventually(ready, timeout=60)
        admin = AIOKafkaAdminClient(**client_options(settings))
        await admin.start()
        try:
            (described,) = await admin.describe_topics([events])
            added = len(described["partitions"])  # the first partition added now
            await admin.create_partitions({events: NewPartitions(total_count=added + 1)})
        finally:
            await admin.close()
        await eventually(lambda: _logged(auditor, "auditor_partitions_added"), timeout=30)
        now = datetime.now(UTC)
        producer = AIOKafkaProducer(**client_options(settings))
        await producer.start()
        try:
            for event in (grant("j1", 1, now), grant("j2", 2, now + timedelta(milliseconds=5))):
                await producer.send_and_wait(events, json.dumps(event).encode(), partition=added)
        finally:
            await producer.stop()

        async def counted() -> bool:
            return await metric(port, "qm_audit_violations_total", kind="overlap") == 1

        await eventually(counted, timeout=30)


async def _logged(auditor: QmProcess, event: str) -> bool:
    return event in auditor.output()


async def _posted(slack: FakeSlack) -> bool:
    return bool(slack.texts())
