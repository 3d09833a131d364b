"""Waits for a Quartermaster job to end, then branches on its outcome.

Trigger it with ``{"job_id": "…"}`` as its conf. The ``AwaitMessageSensor`` defers to the triggerer,
which reads ``qm.job-events`` (one small record per finished job) and calls Quartermaster's
``app.airflow.job_finished`` on each record until the awaited job's terminal event comes.

The connection ``qm_kafka_job_events`` names the broker and a consumer group of this DAG alone, with
``"auto.offset.reset": "earliest"`` and ``"enable.auto.commit": false``; the sensor commits nothing
(``commit_offset=False``), so every wait reads the topic from its start and also finds a job that
ended before the wait began. The topic has one partition, so one consumer of a group reads at a
time: ``max_active_runs=1``, or one connection (consumer group) per concurrent wait.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.providers.apache.kafka.sensors.kafka import AwaitMessageSensor
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param, task

TOPIC = os.environ.get("QM_TOPIC_PREFIX", "qm.") + "job-events"

with DAG(
    dag_id="qm_wait_for_job",
    schedule=None,
    max_active_runs=1,
    params={"job_id": Param(type="string", minLength=1)},
    tags=["quartermaster"],
):
    job_ended = AwaitMessageSensor(
        task_id="job_ended",
        topics=[TOPIC],
        kafka_config_id="qm_kafka_job_events",
        apply_function="app.airflow.job_finished",
        apply_function_kwargs={"job_id": "{{ params.job_id }}"},
        commit_offset=False,
        poll_interval=0.05,  # the trigger pauses this long after every record of another job
        timeout=6 * 3600,
    )

    @task.branch
    def by_outcome(event: dict[str, Any]) -> str:
        """The terminal event's outcome picks the next task."""
        return "job_succeeded" if event["succeeded"] else "job_did_not_succeed"

    job_succeeded = EmptyOperator(task_id="job_succeeded")
    job_did_not_succeed = EmptyOperator(task_id="job_did_not_succeed")

    by_outcome(job_ended.output) >> [job_succeeded, job_did_not_succeed]
