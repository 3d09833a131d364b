"""Choosing a delivery's targets and reading a webhook's answer (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime

from app.handoff import Delivery, HandoffTargets
from app.handoff.webhook import WebhookTarget, classify_status, payload
from app.settings import Settings


def delivery(webhook_url: str | None = None) -> Delivery:
    return Delivery(
        capture_id="cap-1", job_id="job-1", site="board", url="https://board.example.com/1",
        storage_uri="s3://b/1", sha256="0" * 64, content_type="text/html", size=1,
        captured_at=datetime(2026, 1, 1, tzinfo=UTC), meta={"k": "v"}, attempt=2, dag_id=None,
        webhook_url=webhook_url,
    )  # fmt: skip


def test_a_site_with_a_webhook_gets_the_webhook_target_and_one_without_gets_none() -> None:
    settings = Settings(webhook_timeout_seconds=3.0)
    [target] = HandoffTargets(settings)(delivery("https://hooks.example/c"))
    assert isinstance(target, WebhookTarget) and target.name == "webhook"
    assert target.timeout.read == 3.0
    assert HandoffTargets(settings)(delivery(None)) == []


def test_2xx_succeeds_server_errors_and_throttling_retry_other_client_errors_do_not() -> None:
    assert classify_status(200) is None and classify_status(204) is None
    for status in (500, 502, 503, 408, 429):
        error = classify_status(status)
        assert error is not None and error.retryable, status
    for status in (400, 401, 404, 410, 422):
        error = classify_status(status)
        assert error is not None and not error.retryable, status
        assert error.reason == f"webhook answered HTTP {status}"


def test_the_webhook_body_carries_the_capture_and_its_attempt() -> None:
    body = payload(delivery())
    assert body["capture_id"] == "cap-1" and body["attempt"] == 2
    assert body["captured_at"] == "2026-01-01T00:00:00+00:00" and body["meta"] == {"k": "v"}
