"""A ``capture.ready`` record the relay published twice triggers one DAG run, not two.

The relay publishes an outbox row again when the broker's ack of its first send was lost; the copy
carries the row's ``qm.message_id``. Here the real claim and handoff workers hand two captures off,
the real relay publishes their ``capture.ready`` records, and the first record is then published
again exactly as the relay would (same key, value and headers, same partition). The Kafka
provider's real ``MessageQueueTrigger`` (what an ``AssetWatcher`` runs in the triggerer; each event
it fires is one asset event, which schedules one DAG run) runs with ``app.airflow.capture_ready``.
"""

from __future__ import annotations

import json
from pathlib import Path

from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import ensure_topics, producer_options
from app.settings import Settings
from app.store import Database
from tests.integration.conftest_outbox import read_topic, running_relays
from tests.support.airflow import TriggerRun
from tests.support.captures import running_job, submit
from tests.support.waiting import eventually
from workers.handoff import HandoffWorker
from workers.requests import RequestProcessor


async def test_a_capture_ready_record_published_twice_triggers_one_dag_run(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    # one partition: the copy comes after the first record and before the second capture's
    settings = settings.model_copy(update={"topic_partitions": 1})
    await ensure_topics(settings)
    topic = settings.topic("captures.ready")
    processor = RequestProcessor(settings, Database(engine))
    lease = await running_job(processor, engine, settings)
    worker = HandoffWorker(settings, Database(engine))
    await processor.process(submit(settings, "job-1", lease, "cap-1"))
    assert await worker.hand_off("cap-1") == "handed_off"

    async with running_relays(settings, 1):

        async def published(count: int) -> bool:
            return len(await read_topic(settings, topic)) >= count

        await eventually(lambda: published(1), timeout=30)
        [first] = await read_topic(settings, topic)
        producer = AIOKafkaProducer(**producer_options(settings))
        await producer.start()
        try:  # the relay's second send of the same row
            await producer.send_and_wait(
                topic, first.value, key=first.key, headers=list(first.headers)
            )
        finally:
            await producer.stop()
        await processor.process(submit(settings, "job-1", lease, "cap-2"))
        assert await worker.hand_off("cap-2") == "handed_off"
        await eventually(lambda: published(3), timeout=30)

    records = await read_topic(settings, topic)
    ids = [json.loads(r.value)["capture_id"] for r in records]
    assert ids == ["cap-1", "cap-1", "cap-2"]
    assert dict(records[0].headers)["qm.message_id"] == dict(records[1].headers)["qm.message_id"]
    # the watcher runs its trigger again after each event, as the triggerer does; it fires for
    # cap-1 once, then for cap-2 (on the old code: cap-1 twice, so two DAG runs of one capture)
    run = TriggerRun(
        tmp_path,
        settings.kafka_bootstrap_servers,
        trigger="queue",
        fires=2,
        topics=[topic],
        apply_function="app.airflow.capture_ready",
        apply_function_kwargs={"site": "board"},
        timeout=120,
    ).start()
    try:
        events = run.events(timeout=150)
    finally:
        run.stop()
    assert [event["capture_id"] for event in events] == ["cap-1", "cap-2"]
