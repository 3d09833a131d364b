"""Airflow's real Kafka triggers with Quartermaster's apply functions, against the real broker.

The triggers run in Airflow's own virtual environment (``make airflow``), exactly as the triggerer
runs them for an ``AwaitMessageSensor`` or an ``AssetWatcher``; the jobs run through the real
``qm`` processes and the SDK.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import client_options, ensure_topics, sdk_client
from app.sdk import Job, JobRejected
from app.settings import Settings
from tests.integration.conftest_outbox import read_topic
from tests.support.airflow import DAGS, TriggerRun, airflow_env, run_in_airflow
from tests.support.leasing import make_site
from tests.support.processes import QmProcess
from tests.support.waiting import eventually

# records a foreign producer (or a broken one) could leave on the topic
MALFORMED: list[bytes | None] = [
    b"\x00\xff not json",
    b"[]",
    b'"job.succeeded"',
    b"{}",
    None,  # a tombstone
]


async def produce(settings: Settings, topic: str, values: list[bytes | None]) -> None:
    producer = AIOKafkaProducer(**client_options(settings))
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


async def run_jobs(settings: Settings, ids: dict[str, str]) -> None:
    """Finish jobs in the order: other successes/failures, a timed-out wait, then the awaited ones."""

    class Crash(Exception):
        pass

    async with sdk_client(settings, collector="airflow-test") as client:
        async with client.job(site="board", job_id=ids["other_ok"], wait_seconds=30):
            pass
        with pytest.raises(Crash):
            async with client.job(site="board", job_id=ids["other_failed"], wait_seconds=30):
                raise Crash
        async with client.job(site="board", job_id=ids["holder"], wait_seconds=30):
            # capacity is 1: this one waits one second and times out
            with pytest.raises(JobRejected, match="timed_out"):
                async with client.job(site="board", job_id=ids["timed_out"], wait_seconds=1):
                    pass
        async with client.job(site="board", job_id=ids["succeeded"], wait_seconds=30):
            pass
        with pytest.raises(Crash):
            async with client.job(site="board", job_id=ids["failed"], wait_seconds=30):
                raise Crash


def awaiting(tmp_path: Path, settings: Settings, job_id: str) -> TriggerRun:
    return TriggerRun(
        tmp_path,
        settings.kafka_bootstrap_servers,
        trigger="await",
        topics=[settings.topic("job-events")],
        apply_function="app.airflow.job_finished",
        apply_function_kwargs={"job_id": job_id},
        timeout=150,
    )


async def test_await_message_trigger_fires_for_the_awaited_job_only_with_its_outcome(
    topics: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=1, n_accounts=1)
    ids = {
        name: f"{name}-{uuid.uuid4().hex[:8]}"
        for name in ("other_ok", "other_failed", "holder", "timed_out", "succeeded", "failed")
    }
    await produce(settings, settings.topic("job-events"), MALFORMED)
    runs = {
        name: awaiting(tmp_path, settings, ids[name])
        for name in ("timed_out", "succeeded", "failed")
    }
    try:
        for run in runs.values():
            run.start()  # they wait while the jobs run
        with QmProcess(settings, "all"):
            await run_jobs(settings, ids)
        events = {name: run.events(timeout=150) for name, run in runs.items()}
        # a wait that starts after its job ended still finds it
        late = awaiting(tmp_path, settings, ids["succeeded"]).start()
        late_events = late.events(timeout=150)
    finally:
        for run in runs.values():
            run.stop()

    assert [e["job_id"] for e in events["succeeded"]] == [ids["succeeded"]]
    assert events["succeeded"][0]["outcome"] == "succeeded"
    assert events["succeeded"][0]["succeeded"] is True
    assert events["succeeded"][0]["site"] == "board"
    assert events["failed"] == [
        {**events["failed"][0], "job_id": ids["failed"], "outcome": "failed", "succeeded": False}
    ]
    assert events["timed_out"][0]["job_id"] == ids["timed_out"]
    assert events["timed_out"][0]["outcome"] == "timed_out"
    assert late_events == events["succeeded"]


async def ready_on_topic(settings: Settings) -> list[dict[str, Any]]:
    """The capture.ready records on ``qm.captures.ready``, in their order."""
    records = await read_topic(settings, settings.topic("captures.ready"))
    values = [r.value for r in records if r.value is not None and r.value not in MALFORMED]
    return [v for v in map(json.loads, values) if v["type"] == "capture.ready"]


async def submit(job: Job, site: str, content_type: str) -> str:
    return await job.submit_capture(
        url=f"https://{site}.example.com/items/{uuid.uuid4().hex[:8]}",
        storage_uri=f"s3://captures/{uuid.uuid4().hex}",
        sha256=hashlib.sha256(os.urandom(8)).hexdigest(),
        content_type=content_type,
        size=1234,
        meta={"page": 1},
    )


async def test_message_queue_trigger_fires_once_per_handed_off_capture_of_the_site(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    # one partition, so the records the trigger must pass over come before the ones it must take
    settings = settings.model_copy(update={"topic_partitions": 1})
    await ensure_topics(settings)
    await make_site(engine, settings, "board", capacity=2, n_accounts=2)
    await make_site(engine, settings, "forum", capacity=2, n_accounts=2)
    await produce(settings, settings.topic("captures.ready"), MALFORMED)
    run = TriggerRun(
        tmp_path,
        settings.kafka_bootstrap_servers,
        trigger="queue",
        fires=2,
        topics=[settings.topic("captures.ready")],
        apply_function="app.airflow.capture_ready",
        apply_function_kwargs={"site": "board", "content_type": "text/html"},
        timeout=150,
    ).start()  # it waits while collectors submit captures and the handoff worker hands them off
    try:
        with QmProcess(settings, "all"):
            async with sdk_client(settings, collector="c") as client:
                async with client.job(site="forum", wait_seconds=30) as job:
                    await submit(job, "forum", "text/html")
                async with client.job(site="board", wait_seconds=30) as job:
                    await submit(job, "board", "image/png")
                await eventually(lambda: has_records(settings, 2), timeout=60)
                async with client.job(site="board", wait_seconds=30) as job:
                    wanted = {
                        await submit(job, "board", "text/html"),
                        await submit(job, "board", "text/html; charset=utf-8"),
                    }
                await eventually(lambda: has_records(settings, 4), timeout=60)
            events = run.events(timeout=150)
    finally:
        run.stop()

    ready = [r for r in await ready_on_topic(settings) if r["capture_id"] in wanted]
    assert len(ready) == 2
    assert events == [{k: v for k, v in r.items() if k not in ("type", "v")} for r in ready]


async def has_records(settings: Settings, n: int) -> bool:
    return len(await ready_on_topic(settings)) >= n


def test_example_dags_import_cleanly_in_airflow(tmp_path: Path) -> None:
    done = run_in_airflow("dagbag.py", str(DAGS), env=airflow_env(tmp_path), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    bag = json.loads(done.stdout.strip().splitlines()[-1])
    assert bag["import_errors"] == {}
    assert bag["warnings"] == {}
    assert bag["dag_ids"] == ["qm_board_captures", "qm_capture_handoff", "qm_wait_for_job"]
    assert bag["schedules"]["qm_board_captures"] == "AssetTriggeredTimetable"
    assert {"job_ended", "by_outcome", "job_succeeded", "job_did_not_succeed"} == set(
        bag["tasks"]["qm_wait_for_job"]
    )
