"""Captures trigger DAG runs on a real Airflow: the handoff worker's Airflow target against a real
``airflow api-server`` (its own SQLite metadata database, the example DAGs, token auth) on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cli import app as cli_app
from app.handoff import Delivery, TargetError
from app.handoff import airflow as airflow_target
from app.handoff.airflow import AirflowTarget, dag_run_id
from app.settings import Settings
from app.store import Database
from tests.integration.conftest_outbox import read_topic, running_relays
from tests.support.airflow import ApiServer
from tests.support.captures import (
    capture_body,
    capture_row,
    outbox_payloads,
    running_job,
    running_reaper,
    submit,
)
from tests.support.cli import operator_cli
from tests.support.leasing import make_site
from tests.support.processes import QmProcess
from tests.support.waiting import eventually
from workers.handoff import HandoffWorker
from workers.requests import RequestProcessor

DAG = "qm_capture_handoff"  # infra/airflow/dags/qm_capture_handoff.py


@pytest.fixture(scope="module")
def airflow_api() -> Iterator[ApiServer]:
    with ApiServer() as server:
        yield server


def with_airflow(settings: Settings, server: ApiServer) -> Settings:
    return settings.model_copy(
        update={
            "airflow_url": server.url,
            "airflow_username": server.username,
            "airflow_password": SecretStr(server.password),
        }
    )


async def board_with_dag(engine: AsyncEngine, settings: Settings, dag_id: str) -> None:
    await make_site(engine, settings, capacity=10, n_accounts=10)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE sites SET dag_id = :dag_id"), {"dag_id": dag_id})


def runs_of(server: ApiServer, capture_id: str) -> list[dict]:
    run_id = dag_run_id(capture_id)
    return [run for run in server.dag_runs(DAG) if run["dag_run_id"] == run_id]


def delivery(capture_id: str, dag_id: str = DAG) -> Delivery:
    body = capture_body(capture_id)
    return Delivery(
        capture_id=capture_id,
        job_id="job-1",
        site="board",
        url=body["url"],
        storage_uri=body["storage_uri"],
        sha256=body["sha256"],
        content_type=body["content_type"],
        size=body["size"],
        captured_at=datetime(2026, 1, 1, tzinfo=UTC),
        meta=body["meta"],
        attempt=1,
        dag_id=dag_id,
        webhook_url=None,
    )


async def test_a_capture_triggers_one_run_of_its_sites_dag_with_the_capture_as_conf(
    topics: Settings, engine: AsyncEngine, airflow_api: ApiServer
) -> None:
    settings = with_airflow(topics, airflow_api)
    processor = RequestProcessor(settings, Database(engine))
    await board_with_dag(engine, settings, DAG)
    lease = await running_job(processor, engine, settings)
    capture_id = f"{settings.topic_prefix}cap/1@x"  # unique per test; '/' and '@' need escaping
    await processor.process(submit(settings, "job-1", lease, capture_id))

    assert await HandoffWorker(settings, Database(engine)).hand_off(capture_id) == "handed_off"
    [run] = await asyncio.to_thread(runs_of, airflow_api, capture_id)
    body = capture_body(capture_id)
    assert run["conf"] == {
        **{k: body[k] for k in ("url", "storage_uri", "sha256", "content_type", "size", "meta")},
        "capture_id": capture_id,
        "job_id": "job-1",
        "site": "board",
        "captured_at": "2026-01-01T00:00:00+00:00",
    }
    assert run["run_type"] == "manual" and run["state"] == "queued"
    # the same capture again (a repeated handoff) is a success and makes no second run
    await AirflowTarget.from_settings(settings).deliver(delivery(capture_id))
    assert len(await asyncio.to_thread(runs_of, airflow_api, capture_id)) == 1
    [ready] = await outbox_payloads(engine, settings.topic("captures.ready"))
    assert ready["capture_id"] == capture_id


async def test_an_unknown_dag_id_fails_the_capture_at_once_with_the_reason(
    topics: Settings, engine: AsyncEngine, airflow_api: ApiServer
) -> None:
    settings = with_airflow(topics, airflow_api)
    processor = RequestProcessor(settings, Database(engine))
    await board_with_dag(engine, settings, "no_such_dag")
    lease = await running_job(processor, engine, settings)
    await processor.process(submit(settings, "job-1", lease, "cap-1"))

    assert await HandoffWorker(settings, Database(engine)).hand_off("cap-1") == "failed"
    row = await capture_row(engine, "cap-1")
    assert row["status"] == "FAILED" and row["attempts"] == 1
    assert row["last_error"] == "airflow: Airflow has no DAG 'no_such_dag' (HTTP 404)"
    assert await outbox_payloads(engine, settings.topic("captures.ready")) == []
    [dead] = await outbox_payloads(engine, settings.topic("captures.dlt"))
    assert dead["capture_id"] == "cap-1"


async def test_the_documented_remedy_hands_off_a_capture_whose_dag_id_was_wrong(
    topics: Settings, engine: AsyncEngine, airflow_api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/airflow.md: fix the site's dag_id, then `qm dlt replay captures --key CAPTURE`
    settings = with_airflow(topics, airflow_api)
    processor = RequestProcessor(settings, Database(engine))
    await board_with_dag(engine, settings, "no_such_dag")
    lease = await running_job(processor, engine, settings)
    capture_id = f"{settings.topic_prefix}cap-mended"
    await processor.process(submit(settings, "job-1", lease, capture_id))
    assert await HandoffWorker(settings, Database(engine)).hand_off(capture_id) == "failed"
    dlt = settings.topic("captures.dlt")

    monkeypatch.setenv("COLUMNS", "250")  # the summary on one line
    with operator_cli(settings, monkeypatch) as cli:

        async def qm(*args: str) -> list[str]:
            done = await asyncio.to_thread(cli.invoke, cli_app, list(args))
            assert done.exit_code == 0, done.output
            return [line.strip() for line in done.stdout.splitlines() if line.strip()]

        async def dead_lettered() -> bool:
            return len(await read_topic(settings, dlt)) == 1

        with QmProcess(settings, "all"):  # the relay and the handoff worker among them
            await eventually(dead_lettered, timeout=60)
            await qm("sites", "set", "board", "--dag-id", DAG)
            assert await qm("dlt", "replay", "captures", "--key", capture_id) == [
                f"1 selected, 1 replayed to {settings.topic('captures')} (1), "
                "0 skipped as already replayed"
            ]
            await eventually(lambda: handed_off(engine, capture_id), timeout=60)
            # a replay that would have nothing to do says so
            again = await qm("dlt", "replay", "captures", "--key", capture_id, "--again")
            assert again[0] == (
                "1 selected, 0 replayed, 0 skipped as already replayed, "
                "1 not replayed (their capture is not FAILED)"
            )
            assert again[1].endswith(
                f"capture {capture_id} is HANDED_OFF, not FAILED; nothing to hand off again"
            )
    [run] = await asyncio.to_thread(runs_of, airflow_api, capture_id)
    assert run["conf"]["capture_id"] == capture_id


async def test_a_refused_token_is_fetched_again_and_a_wrong_password_is_a_retryable_reason(
    settings: Settings, airflow_api: ApiServer
) -> None:
    settings = with_airflow(settings, airflow_api)
    capture_id = f"{settings.topic_prefix}cap-token"
    airflow_target._tokens[(airflow_api.url, airflow_api.username)] = "not-a-jwt"
    await AirflowTarget.from_settings(settings).deliver(delivery(capture_id))
    assert len(await asyncio.to_thread(runs_of, airflow_api, capture_id)) == 1

    wrong = AirflowTarget(airflow_api.url, "intruder", "guess", 10.0)
    with pytest.raises(TargetError) as refused:
        await wrong.deliver(delivery(f"{capture_id}-2"))
    assert refused.value.retryable
    assert refused.value.reason == "Airflow refused the login of 'intruder' (HTTP 401)"
    assert "guess" not in str(refused.value)
    assert await asyncio.to_thread(runs_of, airflow_api, f"{capture_id}-2") == []


async def handed_off(engine: AsyncEngine, capture_id: str) -> bool:
    return (await capture_row(engine, capture_id))["status"] == "HANDED_OFF"


@pytest.mark.chaos
async def test_a_handoff_killed_after_triggering_the_run_makes_no_second_run(
    topics: Settings, engine: AsyncEngine, airflow_api: ApiServer
) -> None:
    settings = with_airflow(topics, airflow_api).model_copy(update={"handoff_lease_seconds": 3.0})
    processor = RequestProcessor(settings, Database(engine))
    await board_with_dag(engine, settings, DAG)
    lease = await running_job(processor, engine, settings)
    capture_id = f"{settings.topic_prefix}cap-killed"
    await processor.process(submit(settings, "job-1", lease, capture_id))
    async with running_relays(settings, 1):
        fault = {"fault_point": "handoff_after_effect", "fault_job_id": "job-1"}
        with QmProcess(settings, "handoff", **fault) as doomed:
            assert await asyncio.to_thread(doomed.wait, 90) == -9, doomed.output()[-3000:]
        assert (await capture_row(engine, capture_id))["status"] == "HANDING_OFF"
        assert len(await asyncio.to_thread(runs_of, airflow_api, capture_id)) == 1
        async with running_reaper(settings):
            with QmProcess(settings, "handoff") as survivor:
                await eventually(lambda: handed_off(engine, capture_id), timeout=60)
                assert survivor.proc is not None and survivor.proc.poll() is None
                assert airflow_api.password not in survivor.output()
        ready = await read_topic(settings, settings.topic("captures.ready"))
    # the survivor triggered the same run again (409): still one run, and one capture.ready
    assert len(await asyncio.to_thread(runs_of, airflow_api, capture_id)) == 1
    assert [json.loads(r.value)["capture_id"] for r in ready] == [capture_id]
