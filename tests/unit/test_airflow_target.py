"""The Airflow target's pure parts: run ids derived from capture ids, and what an answer means."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from app.handoff import Delivery, HandoffTargets, TargetError
from app.handoff.airflow import RUN_ID_MAX, AirflowTarget, classify_status, conf, dag_run_id
from app.handoff.webhook import WebhookTarget
from app.settings import Settings

AIRFLOW_RUN_ID = re.compile(r"^[A-Za-z0-9_.~:+-]+$")  # Airflow's default allowed_run_id_pattern
CAPTURE_ID = st.from_regex(r"[A-Za-z0-9._:@/-]{1,200}", fullmatch=True)


def test_a_plain_capture_id_reads_in_its_run_id() -> None:
    assert dag_run_id("cap-1") == "qm-cap-1"
    assert dag_run_id("board/2026@x") == "qm-board~2f2026~40x"


@given(CAPTURE_ID)
def test_every_capture_id_has_a_run_id_airflow_accepts(capture_id: str) -> None:
    run_id = dag_run_id(capture_id)
    assert AIRFLOW_RUN_ID.match(run_id) and len(run_id) <= RUN_ID_MAX
    assert dag_run_id(capture_id) == run_id


@given(CAPTURE_ID, CAPTURE_ID)
def test_two_capture_ids_never_share_a_run_id(a: str, b: str) -> None:
    assert (dag_run_id(a) == dag_run_id(b)) is (a == b)


def test_a_long_capture_id_is_hashed() -> None:
    long_id = "@" * 200
    assert dag_run_id(long_id).startswith("qm~") and len(dag_run_id(long_id)) == 67
    assert dag_run_id(long_id) != dag_run_id("@" * 199)


@pytest.mark.parametrize("status", [200, 201, 409])
def test_a_run_that_exists_now_is_success(status: int) -> None:
    assert classify_status(status, "d") is None


@pytest.mark.parametrize(
    ("status", "retryable", "reason"),
    [
        (404, False, "Airflow has no DAG 'd' (HTTP 404)"),
        (400, False, "Airflow answered HTTP 400"),
        (422, False, "Airflow answered HTTP 422"),
        (403, True, "Airflow refused to trigger 'd' (HTTP 403)"),
        (429, True, "Airflow answered HTTP 429"),
        (500, True, "Airflow answered HTTP 500"),
        (503, True, "Airflow answered HTTP 503"),
    ],
)
def test_what_an_answer_means(status: int, retryable: bool, reason: str) -> None:
    error = classify_status(status, "d")
    assert error is not None
    assert (error.retryable, error.reason) == (retryable, reason)


def delivery(dag_id: str | None, webhook_url: str | None = None) -> Delivery:
    return Delivery(
        capture_id="cap-1", job_id="job-1", site="board", url="https://board.example.com/1",
        storage_uri="s3://b/1", sha256="0" * 64, content_type="text/html", size=1,
        captured_at=datetime(2026, 1, 1, tzinfo=UTC), meta={"k": "v"}, attempt=2, dag_id=dag_id,
        webhook_url=webhook_url,
    )  # fmt: skip


def test_a_site_with_a_dag_id_gets_the_airflow_target_after_its_webhook() -> None:
    settings = Settings(
        airflow_url="http://airflow:8080/",
        airflow_username="qm",
        airflow_password=SecretStr("pw"),
        airflow_timeout_seconds=4.0,
    )
    [target] = HandoffTargets(settings)(delivery("d"))
    assert isinstance(target, AirflowTarget) and target.name == "airflow"
    assert (target.url, target.username, target.password) == ("http://airflow:8080", "qm", "pw")
    assert target.timeout.read == 4.0
    webhook, airflow = HandoffTargets(settings)(delivery("d", "https://hooks.example/c"))
    assert isinstance(webhook, WebhookTarget) and isinstance(airflow, AirflowTarget)
    assert HandoffTargets(settings)(delivery(None)) == []


def test_the_runs_conf_is_the_capture() -> None:
    assert conf(delivery("d")) == {
        "capture_id": "cap-1",
        "job_id": "job-1",
        "site": "board",
        "url": "https://board.example.com/1",
        "storage_uri": "s3://b/1",
        "sha256": "0" * 64,
        "content_type": "text/html",
        "size": 1,
        "captured_at": "2026-01-01T00:00:00+00:00",
        "meta": {"k": "v"},
    }


async def test_without_an_airflow_url_a_capture_fails_for_good_with_the_reason() -> None:
    with pytest.raises(TargetError) as failed:
        await AirflowTarget(None, "qm", "pw", 1.0).deliver(delivery("d"))
    assert not failed.value.retryable
    assert failed.value.reason == "no Airflow to trigger: QM_AIRFLOW_URL is not set"
