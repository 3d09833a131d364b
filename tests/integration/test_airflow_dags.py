"""The example DAGs run whole in a real Airflow (``airflow dags test``: one process, deferred tasks
and their triggers included) against the real broker and the jobs of the real ``qm`` processes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from app.handoff import Delivery
from app.handoff.airflow import conf
from app.kafka import sdk_client
from app.settings import Settings
from tests.support.airflow import DagTests, kafka_connection
from tests.support.leasing import make_site
from tests.support.processes import QmProcess


class Crash(Exception):
    pass


def connection(settings: Settings) -> dict[str, str]:
    """The DAG's Kafka connection with a consumer group of its own, as concurrent waits need."""
    group = f"airflow-{uuid.uuid4().hex[:8]}"
    return {
        "AIRFLOW_CONN_QM_KAFKA_JOB_EVENTS": kafka_connection(
            settings.kafka_bootstrap_servers, group
        )
    }


async def test_the_wait_for_job_dag_branches_on_how_the_awaited_job_ended(
    topics: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=1, n_accounts=1)
    dags = DagTests(tmp_path, QM_TOPIC_PREFIX=settings.topic_prefix)
    ok, failed = f"ok-{uuid.uuid4().hex[:8]}", f"failed-{uuid.uuid4().hex[:8]}"
    # waits while the jobs run
    waiting = dags.start("qm_wait_for_job", {"job_id": failed}, **connection(settings))
    try:
        with QmProcess(settings, "all"):
            async with sdk_client(settings, collector="c") as client:
                async with client.job(site="board", job_id=ok, wait_seconds=30):
                    pass
                try:
                    async with client.job(site="board", job_id=failed, wait_seconds=30):
                        raise Crash
                except Crash:
                    pass
        await asyncio.to_thread(dags.finish, waiting, 240)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate(timeout=10)
    # a wait that begins after its job ended finds it too
    late = dags.start("qm_wait_for_job", {"job_id": ok}, **connection(settings))
    await asyncio.to_thread(dags.finish, late, 240)

    after_failure = dags.run_with("qm_wait_for_job", {"job_id": failed})
    assert after_failure["state"] == "success"
    assert after_failure["tasks"] == {
        "job_ended": "success",
        "by_outcome": "success",
        "job_succeeded": "skipped",
        "job_did_not_succeed": "success",
    }
    event = after_failure["returns"]["job_ended"]
    assert (event["job_id"], event["outcome"], event["succeeded"]) == (failed, "failed", False)

    after_success = dags.run_with("qm_wait_for_job", {"job_id": ok})
    assert after_success["tasks"]["job_succeeded"] == "success"
    assert after_success["tasks"]["job_did_not_succeed"] == "skipped"
    assert after_success["returns"]["job_ended"]["outcome"] == "succeeded"


async def test_the_capture_handoff_dag_runs_on_the_conf_the_airflow_target_sends(
    tmp_path: Path,
) -> None:
    capture = Delivery(
        capture_id="cap-1", job_id="job-1", site="board", url="https://board.example.com/1",
        storage_uri="s3://captures/cap-1.html", sha256="0" * 64, content_type="text/html",
        size=10, captured_at=datetime(2026, 1, 1, tzinfo=UTC), meta={"page": 1}, attempt=1,
        dag_id="qm_capture_handoff", webhook_url=None,
    )  # fmt: skip
    dags = DagTests(tmp_path)
    await asyncio.to_thread(dags.finish, dags.start("qm_capture_handoff", conf(capture)), 240)
    run = dags.run_with("qm_capture_handoff", conf(capture))
    assert run["state"] == "success"
    assert run["returns"] == {"process": "cap-1"}
